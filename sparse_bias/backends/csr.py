"""PyTorch sparse CSR kernels: ``sampled_addmm`` for window scores, CSR @ dense for window sums."""
from __future__ import annotations

import warnings

import torch

from .base import Backend, Supports


def _csr(crow, col, values, size):
    # PyTorch prints a beta notice on the first CSR tensor of a process; the kernels used here are stable.
    # Silenced here only, never process-wide (importing the library changes no warning filter).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _flat(t, h, cdt):
    """Head ``h`` of ``t [B, H, N, D]`` as ``[B * N, D]`` in the compute dtype (a copy only when needed)."""
    x = t[:, h]
    return x.reshape(-1, x.shape[-1]).to(cdt)


class SparseCSRBackend(Backend):
    """Per head: one ``sampled_addmm`` or one CSR @ dense product over the block-diagonal ``[B * Q, B * K]`` CSR
    matrix of the whole batch (row ``b * Q + q``, column ``b * K + key``).

    The structure and its transpose come from the index's `sparse_bias._core.entries.Entries` (built once per index,
    without a host sync). Head slices of low-precision inputs are upcast to float32 one at a time (MKL has no
    bfloat16 CSR kernels), so the extra memory is one ``[B * K, D]`` slice.
    """

    name = "sparse"
    supports = Supports(auto_rank={"cpu": 1, "cuda": 3, "other": 2})
    description = "torch.sparse CSR kernels (sampled_addmm, CSR @ dense)"
    #: one head per block of the correction: each head's CSR values are one contiguous [nnz] vector
    head_block = 1

    @staticmethod
    def _cols(blk):
        """LongTensor ``[nnz]``: the global column ``b * K + key`` of each entry."""
        return blk.batch * blk.ent.keys + blk.ent.key

    def sddmm(self, blk, x, y):
        cdt, ent = blk.call.cdt, blk.ent
        out = torch.empty(blk.heads, ent.nnz, dtype=cdt, device=x.device)
        if ent.nnz:
            pattern = _csr(ent.indptr, self._cols(blk), torch.zeros(ent.nnz, dtype=cdt, device=x.device),
                           (ent.rows, ent.batch * y.shape[2]))
            for i, h in enumerate(range(blk.hs.start, blk.hs.stop)):
                out[i] = torch.sparse.sampled_addmm(pattern, _flat(x, h, cdt), _flat(y, h, cdt).t(), beta=0.0).values()
        return out

    def spmm(self, blk, w, y):
        cdt, ent = blk.call.cdt, blk.ent
        out = torch.zeros(blk.heads, ent.rows, y.shape[-1], dtype=cdt, device=y.device)
        if ent.nnz:
            cols = self._cols(blk)
            for i, h in enumerate(range(blk.hs.start, blk.hs.stop)):
                out[i].addmm_(_csr(ent.indptr, cols, w[i], (ent.rows, ent.batch * y.shape[2])), _flat(y, h, cdt))
        return out

    def spmm_t(self, blk, w, x, out):
        cdt, ent = blk.call.cdt, blk.ent
        if not ent.nnz:
            return
        bsz, _, nk, d = out.shape
        for i, h in enumerate(range(blk.hs.start, blk.hs.stop)):
            mat = _csr(ent.tcrow, ent.trow, w[i][ent.perm], (bsz * nk, ent.rows))     # values in key order
            out[:, h] += (mat @ _flat(x, h, cdt)).view(bsz, nk, d).to(out.dtype)
