"""Backends evaluating the window terms of the sparse correction.

Every backend implements three primitives over the ``nnz`` window entries of a :class:`WindowIndex`
(``b``, ``q`` and ``key`` of each entry), all accumulated in the compute dtype (float32, or float64
for float64 input):

* ``sddmm(x [B, H, Q, D], y [B, H, K, D]) -> [H, nnz]``: ``<x[b, h, q], y[b, h, key]>`` per entry;
* ``spmm(w [H, nnz], y [B, H, K, D]) -> [B, H, Q, D]``: window sums ``sum_e w[h, e] y[b, h, key_e]``;
* ``spmm_t(w [H, nnz], x [B, H, Q, D], out [B, H, K, D])``: adds ``w[h, e] x[b, h, q_e]`` into the keys.

Entry tensors are head-major (``[H, nnz]``) so that each head's CSR values are one contiguous row.

``"scatter"`` gathers window rows in bounded chunks and reduces them with torch-scatter's
``segment_csr``; ``"torch"`` is the same with native ``index_add_``; ``"sparse"`` uses PyTorch's
sparse CSR kernels (``sampled_addmm`` and CSR @ dense, with the transposed structure built once per
index). ``"dense"`` (materialise the bias) is handled by :mod:`sparse_bias.attention`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .csr import SparseCSRBackend
from .gather import ScatterBackend, TorchBackend, torch_scatter_available

__all__ = ["BACKENDS", "get_backend", "backend_candidates", "torch_scatter_available"]

BACKENDS: Dict[str, object] = {
    "sparse": SparseCSRBackend(),
    "scatter": ScatterBackend(),
    "torch": TorchBackend(),
}

#: ``"auto"`` tries these in order and takes the first that can run (see :func:`backend_candidates`).
AUTO_ORDER = {"cpu": ("sparse", "scatter", "torch"), "cuda": ("scatter", "torch", "sparse")}


def get_backend(name: str):
    return BACKENDS[name]


def backend_candidates(device: torch.device, dtype: torch.dtype) -> List[Tuple[str, bool, str]]:
    """``(name, can_run, why)`` for every sparse backend, in ``"auto"``'s order of preference."""
    order = AUTO_ORDER.get(device.type, ("scatter", "torch", "sparse"))
    return [(name,) + BACKENDS[name].can_run(device, dtype) for name in order]
