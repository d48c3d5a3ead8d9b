"""Gather backends: window rows of k / v / q gathered for all heads at once, in bounded chunks."""
from __future__ import annotations

import importlib.util
import sys
from typing import Iterator, Tuple

import torch

from .base import Backend, Supports

#: Window entries per chunk: bounds the gathered ``[H, chunk, D]`` buffers.
CHUNK_ENTRIES = 1 << 15


def torch_scatter_available() -> bool:
    """True when torch-scatter can be imported (a stub ``None`` in sys.modules counts as missing)."""
    if "torch_scatter" in sys.modules:
        return sys.modules["torch_scatter"] is not None
    return importlib.util.find_spec("torch_scatter") is not None


def _chunks(win, b: int, chunk_entries: int) -> Iterator[Tuple[int, int, int, int]]:
    """``(e0, e1, q0, q1)`` for batch element ``b``: entry ranges aligned to query boundaries, about
    ``chunk_entries`` entries each (a single query with more entries makes a chunk of its own)."""
    nq = win.num_queries
    indptr = win.indptr[b * nq:(b + 1) * nq + 1]
    first, last = int(indptr[0]), int(indptr[-1])
    if last == first:
        return
    targets = torch.arange(first, last, chunk_entries, device=indptr.device)
    cuts = torch.searchsorted(indptr, targets, right=True) - 1          # the query holding each target entry
    bounds = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), nq)]).unique()
    queries, starts = bounds.tolist(), indptr[bounds].tolist()
    for i in range(len(queries) - 1):
        if starts[i + 1] > starts[i]:
            yield starts[i], starts[i + 1], queries[i], queries[i + 1]


class _GatherBackend(Backend):
    name = "gather"
    #: heads per block of the correction: all at once, so each window row is gathered once for all heads
    head_block = None

    description = "native PyTorch gather and index_add"

    def _query_sum(self, vals, local_q, local_indptr, num_queries):   # pragma: no cover - abstract
        raise NotImplementedError

    def sddmm(self, win, b, hs, x, y, cdt):
        e_begin, e_end = win.batch_range(b)
        xb, yb = x[b, hs], y[b, hs]
        out = torch.empty(xb.shape[0], e_end - e_begin, dtype=cdt, device=x.device)
        for e0, e1, _, _ in _chunks(win, b, CHUNK_ENTRIES):
            q, k = win.row[e0:e1] - b * win.num_queries, win.key[e0:e1]
            out[:, e0 - e_begin:e1 - e_begin] = (xb[:, q].to(cdt) * yb[:, k].to(cdt)).sum(-1)
        return out

    def spmm(self, win, b, hs, w, y, cdt):
        e_begin, _ = win.batch_range(b)
        yb = y[b, hs]
        heads, _, d = yb.shape
        out = torch.zeros(heads, win.num_queries, d, dtype=cdt, device=y.device)
        for e0, e1, q0, q1 in _chunks(win, b, CHUNK_ENTRIES):
            vals = yb[:, win.key[e0:e1]].to(cdt) * w[:, e0 - e_begin:e1 - e_begin].unsqueeze(-1)   # [H, n, D]
            local_q = win.row[e0:e1] - (b * win.num_queries + q0)
            local_indptr = win.indptr[b * win.num_queries + q0:b * win.num_queries + q1 + 1] - e0
            out[:, q0:q1] = self._query_sum(vals, local_q, local_indptr, q1 - q0)
        return out

    def spmm_t(self, win, b, hs, w, x, out, cdt):
        e_begin, _ = win.batch_range(b)
        xb, ob = x[b, hs], out[b, hs]
        direct = out.dtype == cdt            # else accumulate in the compute dtype, then add once
        acc = ob if direct else torch.zeros(ob.shape, dtype=cdt, device=out.device)
        for e0, e1, _, _ in _chunks(win, b, CHUNK_ENTRIES):
            q = win.row[e0:e1] - b * win.num_queries
            vals = xb[:, q].to(cdt) * w[:, e0 - e_begin:e1 - e_begin].unsqueeze(-1)                # [H, n, D]
            acc.index_add_(1, win.key[e0:e1], vals)
        if not direct:
            ob += acc.to(out.dtype)


class TorchBackend(_GatherBackend):
    """Native PyTorch: gathers plus ``index_add_`` for the per-query sums."""

    name = "torch"
    supports = Supports(devices=None, auto_rank={"cpu": 3, "cuda": 2, "other": 1})

    def _query_sum(self, vals, local_q, local_indptr, num_queries):
        heads, _, d = vals.shape
        return torch.zeros(heads, num_queries, d, dtype=vals.dtype, device=vals.device).index_add_(1, local_q, vals)


class ScatterBackend(_GatherBackend):
    """Gathers reduced per query with torch-scatter's ``segment_csr`` (needs the ``scatter`` extra)."""

    name = "scatter"
    supports = Supports(devices=None, auto_rank={"cpu": 2, "cuda": 1, "other": 0})
    description = "torch-scatter segment_csr over gathered window rows"

    def available(self):
        if not torch_scatter_available():
            return False, "torch-scatter is not installed (pip install sparse_bias[scatter])"
        return True, self.description

    def _query_sum(self, vals, local_q, local_indptr, num_queries):
        from torch_scatter import segment_csr
        return segment_csr(vals, local_indptr.expand(vals.shape[0], -1), reduce="sum")

    def _segment(self, win, blk, vals, reduce):
        from torch_scatter import segment_csr
        nq = win.num_queries
        indptr = win.indptr[blk.b * nq:(blk.b + 1) * nq + 1] - blk.e0
        return segment_csr(vals, indptr.expand(vals.shape[0], -1), reduce=reduce)

    def segment_max(self, win, blk, vals):
        out = self._segment(win, blk, vals, "max")
        return out.masked_fill_(win.counts()[blk.b] == 0, float("-inf"))     # segment_csr gives 0 for none

    def segment_sum(self, win, blk, vals):
        return self._segment(win, blk, vals, "sum")
