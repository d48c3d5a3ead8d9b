"""Gather backends: window rows of k / v / q gathered for all heads at once, in bounded chunks of entries."""
from __future__ import annotations

import importlib.util
import sys

import torch

from .base import Backend, Supports

#: Window entries per chunk: bounds the gathered ``[chunk, H, D]`` buffers.
CHUNK_ENTRIES = 1 << 15


def torch_scatter_available() -> bool:
    """True when torch-scatter can be imported (a stub ``None`` in sys.modules counts as missing)."""
    if "torch_scatter" in sys.modules:
        return sys.modules["torch_scatter"] is not None
    return importlib.util.find_spec("torch_scatter") is not None


def _chunks(nnz: int):
    """``(e0, e1)`` entry ranges of at most `CHUNK_ENTRIES` (from the size alone: no device value is read)."""
    return [(e0, min(e0 + CHUNK_ENTRIES, nnz)) for e0 in range(0, nnz, CHUNK_ENTRIES)]


def _rows_view(t: torch.Tensor):
    """``t [B, H, K, D]`` as a ``[B * H * K, D]`` tensor of its rows in memory order, when ``t`` is contiguous or
    key-major (``[B, K, H, D]`` in memory, as the flash kernels' gradients are); else None."""
    if t.is_contiguous() or t.transpose(1, 2).is_contiguous():
        return t.as_strided((t.numel() // max(t.shape[-1], 1), t.shape[-1]), (t.shape[-1], 1))
    return None


class _GatherBackend(Backend):
    name = "gather"
    #: heads per block of the correction: all at once, so each window row is gathered once for all heads
    head_block = None

    description = "native PyTorch gather and index_add"

    def _row_sum(self, blk, vals, e0, e1):   # pragma: no cover - abstract
        """``[B * Q, h, D]``: the sums of ``vals [n, h, D]`` (entries ``e0:e1``) over their rows."""
        raise NotImplementedError

    @staticmethod
    def _gather(blk, x, e0, e1, on_keys: bool):
        """``[n, h, D]``: the rows of ``x [B, H, Q|K, D]`` at entries ``e0:e1`` (their query, or their key)."""
        idx = blk.ent.key[e0:e1] if on_keys else blk.query[e0:e1]
        return x[blk.batch[e0:e1], blk.hs, idx]

    def sddmm(self, blk, x, y):
        cdt = blk.call.cdt
        out = torch.empty(blk.heads, blk.ent.nnz, dtype=cdt, device=x.device)
        for e0, e1 in _chunks(blk.ent.nnz):
            xs, ys = self._gather(blk, x, e0, e1, False), self._gather(blk, y, e0, e1, True)
            out[:, e0:e1] = (xs.to(cdt) * ys.to(cdt)).sum(-1).t()
        return out

    def spmm(self, blk, w, y):
        cdt = blk.call.cdt
        out = torch.zeros(blk.ent.rows, blk.heads, y.shape[-1], dtype=cdt, device=y.device)
        for e0, e1 in _chunks(blk.ent.nnz):
            vals = self._gather(blk, y, e0, e1, True).to(cdt) * w[:, e0:e1].t().unsqueeze(-1)     # [n, h, D]
            out += self._row_sum(blk, vals, e0, e1)
        return out.transpose(0, 1)                                                              # [h, B * Q, D]

    def spmm_t(self, blk, w, x, out):
        cdt = blk.call.cdt
        d = out.shape[-1]
        direct = out.dtype == cdt and _rows_view(out) is not None  # else accumulate in the compute dtype, then add
        acc = out if direct else torch.zeros(out.shape, dtype=cdt, device=out.device)
        flat, (sb, sh, sk) = _rows_view(acc), (st // max(d, 1) for st in acc.stride()[:3])
        h = torch.arange(blk.hs.start, blk.hs.stop, device=x.device)
        for e0, e1 in _chunks(blk.ent.nnz):
            vals = self._gather(blk, x, e0, e1, False).to(cdt) * w[:, e0:e1].t().unsqueeze(-1)     # [n, h, D]
            target = blk.batch[e0:e1, None] * sb + h * sh + blk.ent.key[e0:e1, None] * sk          # [n, h]
            flat.index_add_(0, target.reshape(-1), vals.reshape(-1, d))
        if not direct:
            out += acc.to(out.dtype)


class TorchBackend(_GatherBackend):
    """Native PyTorch: gathers plus ``index_add_`` for the per-row sums."""

    name = "torch"
    supports = Supports(devices=None, auto_rank={"cpu": 3, "cuda": 2, "other": 1})

    def _row_sum(self, blk, vals, e0, e1):
        out = torch.zeros(blk.ent.rows, *vals.shape[1:], dtype=vals.dtype, device=vals.device)
        return out.index_add_(0, blk.ent.row[e0:e1], vals)


class ScatterBackend(_GatherBackend):
    """Gathers reduced per row with torch-scatter's ``segment_csr`` (needs the ``scatter`` extra)."""

    name = "scatter"
    supports = Supports(devices=None, auto_rank={"cpu": 2, "cuda": 1, "other": 0})
    description = "torch-scatter segment_csr over gathered window rows"

    def available(self):
        if not torch_scatter_available():
            return False, "torch-scatter is not installed (`pip install --no-build-isolation torch-scatter==2.1.2`)"
        return True, self.description

    def _row_sum(self, blk, vals, e0, e1):
        from torch_scatter import segment_csr
        return segment_csr(vals, blk.ent.indptr.clamp(e0, e1) - e0, reduce="sum")   # rows outside the chunk: 0

    def _segment(self, blk, vals, reduce):
        from torch_scatter import segment_csr
        return segment_csr(vals, blk.ent.indptr.expand(vals.shape[0], -1), reduce=reduce)

    def segment_max(self, blk, vals):
        out = self._segment(blk, vals, "max")
        return out.masked_fill_(blk.ent.counts() == 0, float("-inf"))     # segment_csr gives 0 for none

    def segment_sum(self, blk, vals):
        return self._segment(blk, vals, "sum")
