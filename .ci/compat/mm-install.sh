#!/usr/bin/env bash
# Install an OpenMMLab stack into a virtualenv that already has torch:
#   .ci/compat/mm-install.sh <venv-python> mm2   # mmcv-lite 2.1.0, mmengine, mmdet 3.3, mmdet3d 1.4 (--no-deps)
#   .ci/compat/mm-install.sh <venv-python> mm1   # mmcv-full 1.7.2 built with CPU ops, mmdet 2.28
# MMCV1_OPS=0 installs mmcv 1.7.2 without ops instead (seconds, but no mmdet.models).
set -euo pipefail
PY=$1
STACK=$2
HERE=$(cd "$(dirname "$0")" && pwd)
pipi() { PIP_CONSTRAINT="" "$PY" -m pip install --quiet "$@"; }
start=$(date +%s)
# mmcv's setup.py imports pkg_resources, which setuptools 70+ no longer ships
pipi "setuptools<70" wheel ninja
case $STACK in
mm2)
    pipi -r "$HERE/mm2.txt"
    pipi --no-deps "mmdet3d==1.4.0"
    ;;
mm1)
    pipi -r "$HERE/mm1.txt"
    if [ "${MMCV1_OPS:-1}" = 1 ]; then
        # built against the venv's torch: no build isolation, no cached wheel of another torch
        MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} pipi --no-build-isolation --no-cache-dir "mmcv-full==1.7.2"
    else
        MMCV_WITH_OPS=0 pipi --no-build-isolation "mmcv==1.7.2"
    fi
    ;;
*)
    echo "usage: $0 <venv-python> mm1|mm2" >&2
    exit 2
    ;;
esac
"$PY" -c "import mmcv, mmengine" 2>/dev/null || "$PY" -c "import mmcv"
echo "[mm-install $STACK] $(( $(date +%s) - start )) s: $("$PY" -m pip list 2>/dev/null | grep -iE '^(mmcv|mmcv-full|mmcv-lite|mmengine|mmdet|mmdet3d) ' | tr -s ' ' '=' | tr '\n' ' ')"
