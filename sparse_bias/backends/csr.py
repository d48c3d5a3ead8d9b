"""PyTorch sparse CSR kernels: ``sampled_addmm`` for window scores, CSR @ dense for window sums."""
from __future__ import annotations

import warnings

import torch

# The beta notice is printed on the first CSR tensor of the process; the kernels used here are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

_CSR_DTYPES = (torch.float32, torch.float64)


def _csr(crow, col, values, size):
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class SparseCSRBackend:
    """Per batch element and head: one ``sampled_addmm`` or one CSR @ dense product.

    The CSR structure of each batch element (and its transpose, for the key-side sums) is built once
    per :class:`WindowIndex` and cached on it. Head slices of low-precision inputs are upcast to float32
    one at a time (MKL has no bfloat16 CSR kernels), so the extra memory is one ``[K, D]`` slice.
    """

    name = "sparse"

    def can_run(self, device, dtype):
        if device.type not in ("cpu", "cuda"):
            return False, f"no sparse CSR kernels on {device.type}"
        return True, "torch.sparse CSR kernels (sampled_addmm, CSR @ dense)"

    @staticmethod
    def _slice(t, b, h, cdt):
        return t[b, h].to(cdt) if t.dtype != cdt else t[b, h]

    def sddmm(self, plan, x, y, cdt):
        heads = x.shape[1]
        out = torch.empty(heads, plan.nnz, dtype=cdt, device=x.device)
        for b, (e0, e1, crow, col, _, _, _) in enumerate(plan.csr()):
            if e1 == e0:
                continue
            pattern = _csr(crow, col, torch.zeros(e1 - e0, dtype=cdt, device=x.device), (x.shape[2], y.shape[2]))
            for h in range(heads):
                res = torch.sparse.sampled_addmm(pattern, self._slice(x, b, h, cdt), self._slice(y, b, h, cdt).t(),
                                                 beta=0.0)
                out[h, e0:e1] = res.values()
        return out

    def spmm(self, plan, w, y, cdt):
        bsz, heads, nk, d = y.shape
        out = torch.zeros(bsz, heads, plan.num_queries, d, dtype=cdt, device=y.device)
        for b, (e0, e1, crow, col, _, _, _) in enumerate(plan.csr()):
            if e1 == e0:
                continue
            for h in range(heads):
                out[b, h].addmm_(_csr(crow, col, w[h, e0:e1], (plan.num_queries, nk)), self._slice(y, b, h, cdt))
        return out

    def spmm_t(self, plan, w, x, out, cdt):
        heads = x.shape[1]
        nk = out.shape[2]
        for b, (e0, e1, _, _, tcrow, trow, perm) in enumerate(plan.csr()):
            if e1 == e0:
                continue
            wt = w[:, e0:e1][:, perm]                                        # [H, n] in key order
            for h in range(heads):
                mat = _csr(tcrow, trow, wt[h], (nk, plan.num_queries))
                if out.dtype == cdt:
                    out[b, h].addmm_(mat, x[b, h])
                else:       # low precision: accumulate this head in float32, then add
                    out[b, h] += (mat @ self._slice(x, b, h, cdt)).to(out.dtype)
