"""Backends evaluating the window terms of the sparse correction.

Every backend implements three primitives over all ``nnz`` window entries of a `WindowIndex` -- every batch
element at once, entry ``e`` in global row ``r = b * Q + q`` (`sparse_bias.backends.base.WindowBlock`: the index's
`sparse_bias._core.entries.Entries`) -- for a block of heads ``hs`` (a slice of ``h`` heads), accumulated in the compute
dtype (float32, or float64 for float64 input), without reading a device value on the host:

* ``sddmm(blk, x [B, H, Q, D], y [B, H, K, D]) -> [h, nnz]``: ``<x[b_e, h, q_e], y[b_e, h, key_e]>``;
* ``spmm(blk, w [h, nnz], y) -> [h, B * Q, D]``: window sums ``sum_e w[h, e] y[b_e, h, key_e]`` per row;
* ``spmm_t(blk, w [h, nnz], x, out [B, H, K, D])``: adds ``w[h, e] x[b_e, h, q_e]`` into ``out[b_e, h, key_e]``.

``head_block`` says how many heads a block holds (None = all): the gather backends gather each window
row once for all heads; the CSR backend works one head at a time (over the block-diagonal ``[B * Q, B * K]``
matrix of the batch), so the correction's temporaries are a few ``[nnz]`` vectors.

``"fused"`` (CPU) and ``"triton"`` (CUDA) override the block methods of `sparse_bias.backends.base.Backend` with fused kernels
(see `sparse_bias.backends.triton`). ``"scatter"`` gathers window rows in bounded chunks and reduces them with torch-scatter's
``segment_csr``; ``"torch"`` is the same with native ``index_add_``; ``"sparse"`` uses PyTorch's
sparse CSR kernels (``sampled_addmm`` and CSR @ dense, with the transposed structure built once per
index). ``"dense"`` (materialise the bias) is handled by `sparse_bias.attention`.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .base import OPS, Backend, Supports
from .csr import SparseCSRBackend
from .fused import FusedCPUBackend, extension_available
from .gather import ScatterBackend, TorchBackend, torch_scatter_available
from .triton.backend import TritonBackend

__all__ = ["BACKENDS", "AUTO_ORDER", "backend_names", "backend_candidates", "Backend", "Supports",
           "torch_scatter_available", "extension_available"]

#: The registry: every backend once, by name. The auto order, the ``backend=`` choices of the ops and CLIs, the
#: benchmark variants and the tests' parametrisation are all derived from it.
BACKENDS: Dict[str, Backend] = {b.name: b for b in (FusedCPUBackend(), SparseCSRBackend(), ScatterBackend(),
                                                     TorchBackend(), TritonBackend())}


def _auto_order(device_type: str) -> Tuple[str, ...]:
    ranked = [(b.supports.auto_rank[device_type], n) for n, b in BACKENDS.items() if device_type in b.supports.auto_rank]
    return tuple(n for _, n in sorted(ranked))


#: ``"auto"`` tries these in order, per device type (``"other"``: any other), and takes the first that can run
#: (derived from each backend's `Supports.auto_rank`; see `backend_candidates`).
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {d: _auto_order(d) for d in ("cpu", "cuda", "other")}


def backend_names(op: str) -> Tuple[str, ...]:
    """The registered backends that evaluate ``op`` (``"correction"`` or ``"window"``), in registry order."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return tuple(n for n, b in BACKENDS.items() if op in b.supports.ops)


def backend_candidates(device: torch.device, dtype: torch.dtype, head_dim=None, op=None
                       ) -> List[Tuple[str, bool, str]]:
    """``(name, can_run, why)`` for every backend (of ``op``, when given), in ``"auto"``'s order of preference."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, AUTO_ORDER["other"])
    return [(n,) + BACKENDS[n].can_run(device, dtype, head_dim, op) for n in order
            if op is None or op in BACKENDS[n].supports.ops]
