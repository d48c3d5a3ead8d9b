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


class SparseCSRBackend(Backend):
    """Per batch element and head: one ``sampled_addmm`` or one CSR @ dense product.

    The CSR structure of each batch element (and its transpose, for the key-side sums) is built once
    per `WindowIndex` and cached on it. Head slices of low-precision inputs are upcast to float32
    one at a time (MKL has no bfloat16 CSR kernels), so the extra memory is one ``[K, D]`` slice.
    """

    name = "sparse"
    supports = Supports(auto_rank={"cpu": 1, "cuda": 3, "other": 2})
    description = "torch.sparse CSR kernels (sampled_addmm, CSR @ dense)"
    #: one head per block of the correction: each head's CSR values are one contiguous [n] vector
    head_block = 1

    @staticmethod
    def _heads(t, b, hs, cdt):
        """The head slices ``t[b, h]`` for h in hs, upcast one at a time when needed."""
        for h in range(hs.start, hs.stop):
            yield h - hs.start, (t[b, h].to(cdt) if t.dtype != cdt else t[b, h])

    def sddmm(self, win, b, hs, x, y, cdt):
        crow, col, _, _, _ = win.csr(b)
        n = col.numel()
        out = torch.empty(hs.stop - hs.start, n, dtype=cdt, device=x.device)
        if n:
            pattern = _csr(crow, col, torch.zeros(n, dtype=cdt, device=x.device), (x.shape[2], y.shape[2]))
            for (i, xh), (_, yh) in zip(self._heads(x, b, hs, cdt), self._heads(y, b, hs, cdt)):
                out[i] = torch.sparse.sampled_addmm(pattern, xh, yh.t(), beta=0.0).values()
        return out

    def spmm(self, win, b, hs, w, y, cdt):
        crow, col, _, _, _ = win.csr(b)
        nk, d = y.shape[2:]
        out = torch.zeros(hs.stop - hs.start, win.num_queries, d, dtype=cdt, device=y.device)
        if col.numel():
            for i, yh in self._heads(y, b, hs, cdt):
                out[i].addmm_(_csr(crow, col, w[i], (win.num_queries, nk)), yh)
        return out

    def spmm_t(self, win, b, hs, w, x, out, cdt):
        _, col, tcrow, trow, perm = win.csr(b)
        if not col.numel():
            return
        nk = out.shape[2]
        for i, xh in self._heads(x, b, hs, cdt):
            mat = _csr(tcrow, trow, w[i][perm], (nk, win.num_queries))       # values in key order
            h = hs.start + i
            if out.dtype == cdt:
                out[b, h].addmm_(mat, xh)
            else:       # low precision: accumulate this head in float32, then add
                out[b, h] += (mat @ xh).to(out.dtype)
