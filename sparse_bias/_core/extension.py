"""The compiled CPU kernels (``sparse_bias._C``): loaded on first use, or None and why.

Two ways to get them, both against the torch of the environment that runs the package:

1. At install time (``setup.py``, ``torch.utils.cpp_extension``, OpenMP) when torch is importable during the build:
   ``pip install --no-build-isolation -e .`` in a checkout (or ``pip install --no-build-isolation
   "git+<repository URL>"``; the Makefile does the first), as torch-scatter is installed.
2. Otherwise (a plain ``pip install``: build isolation hides torch, so the wheel has no ``_C``) they are compiled
   on first use with ``torch.utils.cpp_extension.load`` from the sources shipped in ``sparse_bias/csrc`` with the
   same flags, and cached in torch's extensions directory (``TORCH_EXTENSIONS_DIR``, default
   ``~/.cache/torch_extensions``), so the compile (about 40 s on 2 cores) happens once per torch version,
   source version and CPU. ``SPARSE_BIAS_JIT=0`` turns this off.

Nothing happens at import time: `extension` compiles or loads lazily, the first time a path asks for the kernels
(the ``"fused"`` window backend, ``"auto"`` on CPU, and the dense pass with dropout, `sparse_bias.dense`). When
the kernels are missing (``SPARSE_BIAS_NO_EXT=1`` disables both ways; ``SPARSE_BIAS_JIT=0``; no compiler; a failed
compile) the reason names the command that builds them in this environment and what runs instead: the
pure-PyTorch backends, which give the same results, slower.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
from typing import Any, Dict, Tuple

__all__ = ["extension", "extension_available", "loaded_extension", "SOURCES", "HEADERS", "EXTRA_COMPILE_ARGS",
           "EXTRA_LINK_ARGS", "NO_EXT_ENV", "JIT_ENV", "FIX_COMMAND", "FALLBACK"]

logger = logging.getLogger("sparse_bias")

#: the kernel sources, relative to the package directory (``setup.py`` reads these too: one list, one set of flags)
SOURCES = ("csrc/window_terms.cpp", "csrc/dense_dropout.cpp")
HEADERS = ("csrc/dense_dropout.h", "csrc/dropout_hash.h", "csrc/mask.h", "csrc/parallel.h", "csrc/vec_math.h")
#: fast-math for vectorised loops, but IEEE infinities kept (masked scores are -inf; csrc/vec_math.h)
EXTRA_COMPILE_ARGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only")
EXTRA_LINK_ARGS = ("-fopenmp",)

NO_EXT_ENV = "SPARSE_BIAS_NO_EXT"   # "1": no compiled kernels at all (neither the installed _C nor a JIT build)
JIT_ENV = "SPARSE_BIAS_JIT"         # "0" / "false" / "no" / "off": do not compile the kernels on first use
#: the command that builds the kernels into the environment that runs this package
FIX_COMMAND = ("`pip install --no-build-isolation -e .` in your sparse_bias checkout, in this environment "
               "(docs/install.md)")
#: what runs without the kernels
FALLBACK = ("the pure-PyTorch backends run instead (`sparse` for the window terms, the chunked PyTorch kernel for "
            "attention dropout): same results, slower")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # sparse_bias/, beside csrc/
_lock = threading.Lock()
_cache: Dict[str, Tuple[Any, str]] = {}


def _off(value: str) -> bool:
    return str(value).strip().lower() in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    """The CPU's identity for the cache key: the JIT build uses ``-march=native``, so a build cached in a home
    directory shared by machines with other CPUs must not be loaded there."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _jit_name(torch_version: str) -> str:
    """``sparse_bias_C_<hash>``: one cached build per torch version, Python ABI, source text, flags and CPU."""
    h = hashlib.sha256()
    for part in (torch_version, sys.implementation.cache_tag or "", platform.machine(), _cpu_signature(),
                 " ".join(EXTRA_COMPILE_ARGS), " ".join(EXTRA_LINK_ARGS)):
        h.update(part.encode() + b"\0")
    for rel in SOURCES + HEADERS:
        with open(os.path.join(_PACKAGE_DIR, rel), "rb") as f:
            h.update(f.read())
    return f"sparse_bias_C_{h.hexdigest()[:12]}"


def _missing(how: str) -> str:
    return f"the compiled kernels sparse_bias._C are not installed and {how}; {FALLBACK}. To build them: {FIX_COMMAND}"


def _short(exc: BaseException) -> str:
    """The first line of a (possibly long, compiler-output) error, capped."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line[:200]}" + (" ..." if len(line) > 200 or len(text) > 1 else "")


def _jit_compile() -> Tuple[Any, str]:
    """``(module, why)``: the kernels compiled (or loaded from torch's extensions cache) with
    ``torch.utils.cpp_extension.load``, or None and the reason."""
    if _off(os.environ.get(JIT_ENV, "1")):
        return None, _missing(f"compiling them on first use is off ({JIT_ENV}={os.environ[JIT_ENV]})")
    missing = [rel for rel in SOURCES + HEADERS if not os.path.isfile(os.path.join(_PACKAGE_DIR, rel))]
    if missing:
        return None, _missing(f"their sources are not in the installed package ({', '.join(missing)} missing)")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0] if cxx.split() else "c++") is None:
        return None, _missing(f"they cannot be compiled on first use: no C++ compiler (`{cxx}`) on PATH "
                              "(install one, e.g. g++, or set CXX)")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover - the package imports torch before this runs
        return None, _missing(f"torch.utils.cpp_extension is not importable ({exc})")
    if not cpp_extension.is_ninja_available():
        return None, _missing("they cannot be compiled on first use: ninja is not installed (`pip install ninja`)")
    try:
        name = _jit_name(torch.__version__)
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()  # as torch resolves it
        build_dir = os.path.join(root, name)
        os.makedirs(build_dir, exist_ok=True)
        cached = any(f.startswith(name) and f.endswith((".so", ".pyd")) for f in os.listdir(build_dir))
        if cached:
            logger.debug("loading the fused CPU kernels compiled on first use from %s", build_dir)
        else:
            logger.warning("sparse_bias: compiling the fused CPU kernels (sparse_bias._C) against torch %s on first "
                           "use, once (about 40 s on 2 cores; cached in %s; %s=0 turns this off, %s builds "
                           "them at install time)", torch.__version__, build_dir, JIT_ENV,
                           "`pip install --no-build-isolation -e .` in the checkout")
        start = time.perf_counter()
        module = cpp_extension.load(
            name=name, sources=[os.path.join(_PACKAGE_DIR, rel) for rel in SOURCES],
            extra_cflags=list(EXTRA_COMPILE_ARGS), extra_ldflags=list(EXTRA_LINK_ARGS),
            build_directory=build_dir, with_cuda=False, verbose=False)
    except Exception as exc:  # a compiler error, a missing OpenMP, an unwritable cache, a failed import
        why = _missing(f"compiling them on first use failed ({_short(exc)})")
        logger.warning("sparse_bias: %s", why)
        logger.debug("sparse_bias: the compile error in full:\n%s", exc)
        return None, why
    logger.debug("sparse_bias: fused CPU kernels ready in %.1f s (%s)", time.perf_counter() - start, build_dir)
    return module, f"fused C++/OpenMP kernels (compiled on first use against torch {torch.__version__}, {build_dir})"


def _load() -> Tuple[Any, str]:
    if os.environ.get(NO_EXT_ENV) == "1":
        return None, f"disabled by {NO_EXT_ENV}=1; {FALLBACK}"
    try:
        # built at install time (optional: a build without torch or a compiler has none)
        from .. import _C  # type: ignore[attr-defined]
    except ImportError:
        return _jit_compile()
    return _C, "fused C++/OpenMP kernels (sparse_bias._C)"


def extension() -> Tuple[Any, str]:
    """``(module, why)``: the compiled module, or None and the reason it is missing (with the command that builds
    it and the backend that runs instead). The first call imports ``sparse_bias._C`` or, when the install has none,
    compiles the kernels against the installed torch (once; cached); later calls return the same answer."""
    if "result" not in _cache:
        with _lock:  # one compile, even when several threads ask at once
            if "result" not in _cache:
                _cache["result"] = _load()
    return _cache["result"]


def extension_available() -> bool:
    """True when the fused CPU kernels (``sparse_bias._C``, installed or compiled on first use) can be used."""
    return extension()[0] is not None


def loaded_extension() -> Any:
    """The compiled module if an earlier `extension` call loaded it, else None -- never a compile or an import
    (for code that uses the kernels only when they are already there, e.g. ``sparse_bias._core.threads``)."""
    result = _cache.get("result")
    return None if result is None else result[0]
