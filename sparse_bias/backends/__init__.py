"""Backends evaluating the window terms of the sparse correction.

Every backend implements three primitives over the ``n`` window entries of one batch element ``b``
of a `WindowIndex` (entries ``win.batch_range(b)``) and a block of heads ``hs`` (a slice of
``h`` heads), accumulated in the compute dtype (float32, or float64 for float64 input):

* ``sddmm(win, b, hs, x [B, H, Q, D], y [B, H, K, D]) -> [h, n]``: ``<x[b, h, q_e], y[b, h, key_e]>``;
* ``spmm(win, b, hs, w [h, n], y) -> [h, Q, D]``: window sums ``sum_e w[h, e] y[b, h, key_e]``;
* ``spmm_t(win, b, hs, w [h, n], x, out [B, H, K, D])``: adds ``w[h, e] x[b, h, q_e]`` into ``out[b, hs]``.

``head_block`` says how many heads a block holds (None = all): the gather backends gather each window
row once for all heads; the CSR backend works one head at a time, so the correction's temporaries are
a few ``[n]`` vectors.

``"fused"`` (CPU) and ``"triton"`` (CUDA) override the block methods of `sparse_bias.backends.base.Backend` with fused kernels
(see `sparse_bias.backends.triton_backend`). ``"scatter"`` gathers window rows in bounded chunks and reduces them with torch-scatter's
``segment_csr``; ``"torch"`` is the same with native ``index_add_``; ``"sparse"`` uses PyTorch's
sparse CSR kernels (``sampled_addmm`` and CSR @ dense, with the transposed structure built once per
index). ``"dense"`` (materialise the bias) is handled by `sparse_bias.attention`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .csr import SparseCSRBackend
from .fused import FusedCPUBackend, extension_available
from .gather import ScatterBackend, TorchBackend, torch_scatter_available
from .triton_backend import TritonBackend

__all__ = ["BACKENDS", "get_backend", "backend_candidates", "torch_scatter_available", "extension_available"]

BACKENDS: Dict[str, object] = {
    "fused": FusedCPUBackend(),
    "sparse": SparseCSRBackend(),
    "scatter": ScatterBackend(),
    "torch": TorchBackend(),
    "triton": TritonBackend(),
}

#: ``"auto"`` tries these in order and takes the first that can run (see `backend_candidates`).
AUTO_ORDER = {"cpu": ("fused", "sparse", "scatter", "torch"), "cuda": ("triton", "scatter", "torch", "sparse")}


def get_backend(name: str):
    return BACKENDS[name]


def backend_candidates(device: torch.device, dtype: torch.dtype, head_dim=None) -> List[Tuple[str, bool, str]]:
    """``(name, can_run, why)`` for every sparse backend, in ``"auto"``'s order of preference."""
    order = AUTO_ORDER.get(device.type, ("scatter", "torch", "sparse"))
    return [(name,) + BACKENDS[name].can_run(device, dtype, head_dim) for name in order]
