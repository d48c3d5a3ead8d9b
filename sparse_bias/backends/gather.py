"""Gather backends: window rows of k / v / q gathered for all heads at once, in bounded chunks."""
from __future__ import annotations

import importlib.util
from typing import Iterator, Tuple

import torch

#: Window entries per chunk: bounds the gathered ``[chunk, H, D]`` buffers.
CHUNK_ENTRIES = 1 << 15


def torch_scatter_available() -> bool:
    """True when torch-scatter can be imported (a stub ``None`` in sys.modules counts as missing)."""
    import sys
    if "torch_scatter" in sys.modules:
        return sys.modules["torch_scatter"] is not None
    return importlib.util.find_spec("torch_scatter") is not None


def _chunks(plan, chunk_entries: int) -> Iterator[Tuple[int, int, int, int]]:
    """``(e0, e1, r0, r1)``: entry ranges aligned to CSR row boundaries, about ``chunk_entries`` each."""
    indptr = plan.indptr
    nnz, num_rows = int(indptr[-1]), indptr.numel() - 1
    if nnz == 0:
        return
    targets = torch.arange(0, nnz, chunk_entries, device=indptr.device)
    cuts = torch.searchsorted(indptr, targets, right=True) - 1          # the row holding each target entry
    bounds = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), num_rows)]).unique()
    rows, starts = bounds.tolist(), indptr[bounds].tolist()
    for i in range(len(rows) - 1):
        if starts[i + 1] > starts[i]:
            yield starts[i], starts[i + 1], rows[i], rows[i + 1]


class _GatherBackend:
    name = "gather"

    def can_run(self, device, dtype):
        return True, "native PyTorch gather and index_add"

    def _row_sum(self, vals, local_row, local_indptr, num_rows):   # pragma: no cover - abstract
        raise NotImplementedError

    def sddmm(self, plan, x, y, cdt):
        out = torch.empty(x.shape[1], plan.nnz, dtype=cdt, device=x.device)
        for e0, e1, _, _ in _chunks(plan, CHUNK_ENTRIES):
            b, q, k = plan.batch[e0:e1], plan.query[e0:e1], plan.key[e0:e1]
            out[:, e0:e1] = (x[b, :, q].to(cdt) * y[b, :, k].to(cdt)).sum(-1).t()
        return out

    def spmm(self, plan, w, y, cdt):
        bsz, heads = y.shape[:2]
        rows = torch.zeros(plan.num_rows, heads, y.shape[-1], dtype=cdt, device=y.device)
        for e0, e1, r0, r1 in _chunks(plan, CHUNK_ENTRIES):
            b, k = plan.batch[e0:e1], plan.key[e0:e1]
            vals = y[b, :, k].to(cdt) * w[:, e0:e1].t().unsqueeze(-1)
            rows[r0:r1] = self._row_sum(vals, plan.row[e0:e1] - r0, plan.indptr[r0:r1 + 1] - e0, r1 - r0)
        return rows.view(bsz, -1, heads, y.shape[-1]).transpose(1, 2)

    def spmm_t(self, plan, w, x, out, cdt):
        heads = x.shape[1]
        acc = out if out.dtype == cdt else torch.zeros(out.shape, dtype=cdt, device=out.device)
        h = torch.arange(heads, device=x.device).unsqueeze(0)
        for e0, e1, _, _ in _chunks(plan, CHUNK_ENTRIES):
            b, q, k = plan.batch[e0:e1], plan.query[e0:e1], plan.key[e0:e1]
            vals = x[b, :, q].to(cdt) * w[:, e0:e1].t().unsqueeze(-1)
            acc.index_put_((b.unsqueeze(1), h, k.unsqueeze(1)), vals, accumulate=True)
        if acc is not out:
            out += acc.to(out.dtype)


class TorchBackend(_GatherBackend):
    """Native PyTorch: gathers plus ``index_add_`` for the per-query sums."""

    name = "torch"

    def _row_sum(self, vals, local_row, local_indptr, num_rows):
        return torch.zeros((num_rows,) + vals.shape[1:], dtype=vals.dtype, device=vals.device).index_add_(
            0, local_row, vals)


class ScatterBackend(_GatherBackend):
    """Gathers reduced per query with torch-scatter's ``segment_csr`` (needs the ``scatter`` extra)."""

    name = "scatter"

    def can_run(self, device, dtype):
        if not torch_scatter_available():
            return False, "torch-scatter is not installed (pip install sparse_bias[scatter])"
        return True, "torch-scatter segment_csr over gathered window rows"

    def _row_sum(self, vals, local_row, local_indptr, num_rows):
        from torch_scatter import segment_csr
        return segment_csr(vals, local_indptr, reduce="sum")
