"""Backend choice for the window terms (above the ops): the first backend that can run the call and passes its
first-use self-check (`.selfcheck`).

`choose_backend` walks `sparse_bias.backends.AUTO_ORDER` for the input's device and takes the first backend that can
run the operation there -- none of its `sparse_bias.backends.Backend.not_supported_reasons` -- *and* passes its
self-check. An explicitly requested backend that fails its check falls back the same way, with a warning.

To see the choice: ``SPARSE_BIAS_LOG_DISPATCH=1`` prints each distinct choice once to stderr, with the reasons every
backend ahead of it was skipped (as NATTEN's and xformers' dispatchers can be asked); `sparse_bias.select_backend` /
`sparse_bias.select_window_backend` return it; the logger ``"sparse_bias"`` has it at level DEBUG.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Tuple

import torch

from .compat import CUSTOM_OPS
from .selfcheck import passes_self_check
from ..backends import AUTO_ORDER, BACKENDS, OPS

logger = logging.getLogger("sparse_bias")

__all__ = ["choose_backend", "LOG_DISPATCH_ENV"]

#: ``SPARSE_BIAS_LOG_DISPATCH=1``: print each distinct backend choice once to stderr
LOG_DISPATCH_ENV = "SPARSE_BIAS_LOG_DISPATCH"
_LOGGED: set = set()


def choose_backend(device: torch.device, dtype: torch.dtype, head_dim: int, requested: str = "auto",
                   op: str = "correction") -> Tuple[str, str]:
    """The backend for the window terms and why: ``(name, reason)``.

    Args:
        device: q's device.
        dtype: q's dtype.
        head_dim: ``D`` of ``q [B, H, Q, D]``.
        requested: a backend name or ``"auto"`` (``"dense"`` is handled by the callers).
        op: ``"correction"`` (`sparse_bias.sparse_bias_attention`) or ``"window"``
            (`sparse_bias.window_attention`).

    Raises:
        RuntimeError: a requested backend that cannot run here, or no backend that can.

    The choice is logged (logger ``"sparse_bias"``, level DEBUG). Under ``torch.compile`` it is made once, at trace
    time (`torch.compiler.assume_constant_result`): the graph holds the backend chosen and checked then.
    """
    name, why = _choose_backend(device, dtype, head_dim, requested, op)
    if not CUSTOM_OPS:
        why += ("; this torch has no torch.library.custom_op (2.4+): the op runs as an eager autograd.Function, "
                "which torch.compile cannot trace on this torch (exclude the call: torch._dynamo.disable)")
    logger.debug("%s: backend %s on %s / %s / head dim %d (%s)", op, name, device, dtype, head_dim, why)
    line = f"sparse_bias: {op} on {device} / {dtype} / head dim {head_dim}, {requested!r} -> {name} ({why})"
    if os.environ.get(LOG_DISPATCH_ENV, "0") not in ("", "0") and line not in _LOGGED:
        _LOGGED.add(line)
        print(line, file=sys.stderr)
    return name, why


# A compiled graph takes the choice made (and self-checked) at trace time: what torch.compiler.assume_constant_result
# marks, set directly so that importing the library does not import torch._dynamo (tests/test_compile.py).
choose_backend._dynamo_marked_constant = True


def _choose_backend(device, dtype, head_dim, requested, op):
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    order = AUTO_ORDER.get(device.type, AUTO_ORDER["other"])
    candidates = [(n,) + BACKENDS[n].can_run(device, dtype, head_dim, op) for n in order
                  if op in BACKENDS[n].supports.ops]                     # (name, ok, every reason it cannot)
    note = ""
    if requested != "auto":
        ok, why = BACKENDS[requested].can_run(device, dtype, head_dim, op)
        if not ok:
            raise RuntimeError(f"backend {requested!r} cannot run here: {why}")
        if passes_self_check(requested, device, dtype, head_dim, op):
            return requested, f"requested: {why}"
        note = f" (requested {requested!r} failed its self-check)"
    for name, ok, why in candidates:
        if ok and name != requested and passes_self_check(name, device, dtype, head_dim, op):
            skipped = "; ".join(f"{n}: {w}" for n, o, w in candidates if not o)
            return name, f"auto on {device.type}/{dtype}: {why}" + (f" (skipped {skipped})" if skipped else "") + note
    raise RuntimeError(f"no {op} backend can run on {device} / {dtype}: "
                       + "; ".join(f"{n}: {w}" for n, _, w in candidates) + note)
