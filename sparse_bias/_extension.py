"""The compiled CPU kernels (``sparse_bias._C``): loaded on first use, or None and why.

Built at install time against the installed torch (``setup.py``, ``torch.utils.cpp_extension``, OpenMP). Used by
the dense pass with dropout (`sparse_bias.dense`) and by the ``"fused"`` window backend. When the extension is
missing (not built, or ``SPARSE_BIAS_NO_EXT=1`` at run time) those paths report why and the pure-PyTorch ones run.
"""
from __future__ import annotations

import os
from functools import lru_cache

__all__ = ["extension", "extension_available"]


@lru_cache(maxsize=None)
def extension():
    """``(module, why)``: the compiled module, or None and the reason it is missing."""
    if os.environ.get("SPARSE_BIAS_NO_EXT") == "1":
        return None, "disabled by SPARSE_BIAS_NO_EXT=1"
    try:
        from . import _C  # the compiled extension (optional: a build without a compiler has none)
    except ImportError as exc:
        return None, f"the compiled extension sparse_bias._C is not built ({exc}); reinstall with `make install`"
    return _C, "fused C++/OpenMP kernels (sparse_bias._C)"


def extension_available() -> bool:
    """True when the fused CPU kernels (``sparse_bias._C``) can be used."""
    return extension()[0] is not None
