#!/usr/bin/env bash
# One cell of the support matrix (docs/install.md, "Support matrix"):
#   .ci/compat.sh 2.0.1 [pytest args]        torch pinned in .ci/compat/2.0.1.txt
#   .ci/compat.sh 2.0.1+mm1 [pytest args]    the same, plus an OpenMMLab stack (.ci/compat/mm-install.sh mm1)
# makes (or reuses) a virtualenv under $COMPAT_ROOT, builds torch-scatter (for the torch releases listed in
# $COMPAT_SCATTER when it is set) and the fused kernels against its torch,
# and runs the compatibility subset of the suite (.ci/compat/SUBSET) in a copy of this checkout (the copy keeps the
# kernels built for this torch apart from .venv's). The last line printed is the cell's result; the exit status is
# pytest's (0 also when the package index cannot be reached: the cell is then reported as not run).
set -euo pipefail
main() {
cd "$(dirname "$0")/.."
CELL=$1
shift
TORCH=${CELL%%+*}
STACK=${CELL#"$TORCH"}
STACK=${STACK#+}
REQ=.ci/compat/$TORCH.txt
[ -f "$REQ" ] || { echo "no $REQ: the cells are $(ls .ci/compat/ | grep -E '^[0-9.]+\.txt$' | sed 's/\.txt$//' | tr '\n' ' ')" >&2; exit 2; }
ROOT=${COMPAT_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/sparse_bias/compat}
DIR=$ROOT/torch-$CELL
PY=$DIR/venv/bin/python
LOG=$DIR/log
mkdir -p "$DIR"
: >"$LOG"
say() { echo "[compat $CELL] $*" | tee -a "$LOG"; }
# the machine-wide cap on torch releases (a pip constraint file) does not apply to a pinned cell
pipi() { PIP_CONSTRAINT=/dev/null "$PY" -m pip install --quiet "$@"; }
t0=$(date +%s)
if [ ! -f "$DIR/venv/.cell" ] || [ "$(cat "$DIR/venv/.cell")" != "$(cat $REQ; echo "$STACK")" ]; then
    rm -rf "$DIR/venv"
    python3 -m venv "$DIR/venv"
    start=$(date +%s)
    if ! pipi setuptools wheel ninja -r "$REQ" >>"$LOG" 2>&1; then
        say "RESULT not run: $REQ did not install (package index unreachable? see $LOG)"
        rm -rf "$DIR/venv"
        exit 0
    fi
    say "torch installed in $(( $(date +%s) - start )) s; venv $(du -sm "$DIR/venv" | cut -f1) MB"
    if [ -n "$STACK" ]; then
        .ci/compat/mm-install.sh "$PY" "$STACK" 2>&1 | tee -a "$LOG" | tail -1
    fi
    start=$(date +%s)
    if [ -n "${COMPAT_SCATTER+x}" ] && ! grep -qwF -- "$TORCH" <<<"$COMPAT_SCATTER"; then
        say "torch-scatter not built for this cell (COMPAT_SCATTER=$COMPAT_SCATTER): its backend is skipped"
    elif pipi --no-cache-dir --no-build-isolation "torch-scatter==2.1.2" >>"$LOG" 2>&1; then
        say "torch-scatter built in $(( $(date +%s) - start )) s"
    else
        say "torch-scatter does not build against this torch (see $LOG): its backend is skipped"
    fi
    { cat "$REQ"; echo "$STACK"; } >"$DIR/venv/.cell"
fi
pipi -c "$REQ" pytest hypothesis einops tqdm vermin >>"$LOG" 2>&1
rm -rf "$DIR/src" && mkdir -p "$DIR/src"
git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C "$DIR/src"
start=$(date +%s)
(cd "$DIR/src" && pipi --no-deps --no-build-isolation -e . >>"$LOG" 2>&1) || say "the package did not install (see $LOG)"
say "package (fused kernels) built in $(( $(date +%s) - start )) s"
"$PY" -c "import torch, sys; print('[compat $CELL] torch', torch.__version__, 'python', sys.version.split()[0])" | tee -a "$LOG"
cd "$DIR/src"
set +e
"$PY" -m pytest -q -p no:cacheprovider -o addopts="-ra" --durations=10 $(cat .ci/compat/SUBSET) "$@" 2>&1 | tee -a "$LOG" | tail -40
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -E "(passed|failed|error).* in [0-9.]+s" "$LOG" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
say "RESULT torch $TORCH${STACK:+ + $STACK}: ${summary:-pytest exit $rc}; cell $(( $(date +%s) - t0 )) s"
exit $rc
}
main "$@"    # the whole script is read before it runs: editing it meanwhile cannot change a running cell
