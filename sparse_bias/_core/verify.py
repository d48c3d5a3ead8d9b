"""First-use verification of kernels: one cache, one warning, one policy.

A kernel path that PyTorch, Triton or a GPU could get wrong (a private op whose conventions change between
releases, a Triton miscompile, a layout a kernel mishandles) is compared once per key -- typically (what, kernel,
device, dtype, head dim) -- with a slow-but-right reference on a tiny problem before it is used. A failure warns
once (``RuntimeWarning``) and the caller falls back; it is never a silent wrong result. Callers supply the check:
the dense pass its GPU kernels' (`sparse_bias.dense`), the dispatch its window backends' (`sparse_bias._core.selfcheck`).

``SPARSE_BIAS_SELF_CHECK`` sets which window backends are checked: ``gpu`` (default: every backend on a non-CPU
device, and the Triton kernels wherever they run, the interpreter included), ``always`` (CPU backends too) or
``off``. The dense pass's GPU kernels are always checked. Threads calling at once run each check once: the first
runs it, the others wait for its result (one re-entrant lock: a check may use other checked kernels).
"""
from __future__ import annotations

import os
import threading
import warnings
from typing import Callable, Dict, Tuple

import torch

__all__ = ["verified", "results", "reset", "needs_self_check", "SELF_CHECK_ENV"]

SELF_CHECK_ENV = "SPARSE_BIAS_SELF_CHECK"
_POLICIES = ("gpu", "always", "off")

#: key -> (passed, detail)
_RESULTS: Dict[tuple, Tuple[bool, str]] = {}
_LOCK = threading.RLock()


def verified(key: tuple, check: Callable[[], Tuple[bool, str]], warning: Callable[[str], str]
             ) -> Tuple[bool, str]:
    """``(passed, detail)`` of ``check()``, run once per ``key`` (an exception fails it). On failure
    ``warning(detail)`` is issued once as a ``RuntimeWarning``."""
    result = _RESULTS.get(key)
    if result is not None:                                # checked: no lock on the hot path
        return result
    with _LOCK:
        if key not in _RESULTS:
            with torch.enable_grad():
                try:
                    result = check()
                except Exception as exc:  # noqa: BLE001 - a kernel that fails to run fails its check
                    result = (False, f"it raised {type(exc).__name__}: {exc}")
            _RESULTS[key] = result
            if not result[0]:
                warnings.warn(warning(result[1]), RuntimeWarning, stacklevel=3)
        return _RESULTS[key]


def results() -> Dict[tuple, Tuple[bool, str]]:
    """Every check run so far: ``{key: (passed, detail)}``."""
    return dict(_RESULTS)


def reset() -> None:
    """Forget every result (the checks run again on next use)."""
    with _LOCK:
        _RESULTS.clear()


def _policy() -> str:
    value = os.environ.get(SELF_CHECK_ENV, "gpu").strip().lower()
    if value not in _POLICIES:
        raise ValueError(f"{SELF_CHECK_ENV} must be one of {_POLICIES}, got {value!r}")
    return value


def needs_self_check(name: str, device: torch.device) -> bool:
    """Whether window backend ``name`` on ``device`` is checked before first use under the current policy."""
    policy = _policy()
    if policy == "off":
        return False
    return policy == "always" or device.type != "cpu" or name == "triton"
