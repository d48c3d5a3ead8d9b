"""Triton kernels: the ``"triton"`` backend, the exact rows of the correction, the dense pass with dropout.

Triton is optional. `TRITON_AVAILABLE` says whether it can be imported here (a probe of the installed packages that
does not import it: importing triton is slow, and ``TRITON_INTERPRET=1`` must be set before it is). The launchers
import their kernel module -- and with it triton -- on their first launch, so importing `sparse_bias` never imports
triton, and works without it. They run on CUDA tensors, and on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1``), which is how the tests check the kernels without a GPU.

Modules (kernels, whose import imports triton, apart from their host-side launchers):

* `common_kernels` -- Triton helpers shared by the kernels (a block of window entries, a window row, the
  counter-hash dropout decision);
* `correction_kernels` / `correction` -- the window terms of the sparse correction (one program per row and head);
* `window_kernels` / `window` -- window attention (`window_attention_forward`, `window_attention_backward`);
* `exact_kernels` / `exact` -- the exact rows, decided on the device (`exact_forward`, `exact_backward`);
* `dense_kernels` / `dense` -- the dense pass with dropout (`dense_forward`, `dense_backward`, `call_args`);
* `launch` -- the launchers' shared host helpers (sizes, per-entry operands, the float32 ``dk`` / ``dv`` scratch);
* `backend` -- `TritonBackend`, registered as ``"triton"`` by `sparse_bias.backends`.
"""
from __future__ import annotations

import importlib.util

import torch

from .dense import call_args, dense_backward, dense_forward
from .exact import exact_backward, exact_forward
from .window import window_attention_backward, window_attention_forward

__all__ = ["TRITON_AVAILABLE", "runs_on", "call_args", "dense_forward", "dense_backward", "exact_forward",
           "exact_backward", "window_attention_forward", "window_attention_backward"]

#: Whether triton can be imported here (found among the installed packages; not imported).
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def runs_on(device: torch.device) -> bool:
    """Whether the exact-row kernels serve rows on ``device`` by default (CUDA with Triton installed)."""
    return TRITON_AVAILABLE and device.type == "cuda"
