"""Fused CPU kernels for the window terms: the compiled extension ``sparse_bias._C``.

Built at install time against the installed torch (``setup.py``, ``torch.utils.cpp_extension``, OpenMP), as
torch-scatter is. Per batch element and block of heads: the forward makes one pass over each query's entries
(scores, ``p``, ``a``, ``S``, ``C``); the backward one pass over each query's entries (``<g', v_j>``, ``d_j``, the
``dq`` correction and the bias gradient) and one over each key's entries through the transposed structure the
`sparse_bias.WindowIndex` caches (``dk`` / ``dv``), so every output is written by one thread in a fixed
order: bitwise-repeatable. ``p`` is recomputed in the backward instead of stored. Masks and dropout are read
from the additive mask and the seed inside the kernels (never materialised per entry).

When the extension is missing (not built, or ``SPARSE_BIAS_NO_EXT=1`` at run time) the backend cannot run and
``"auto"`` falls back to the pure-PyTorch backends.
"""
from __future__ import annotations

import torch

from .._extension import extension, extension_available
from ..dense.dropout import seed64
from .base import Backend, Supports

__all__ = ["FusedCPUBackend", "extension_available", "MAX_HEAD_DIM"]

#: the compiled kernels keep a query row in registers (``kMaxHeadDim`` in csrc/window_terms.cpp)
MAX_HEAD_DIM = 512


def _mask(blk):
    """The additive mask, 4-D in the compute dtype (broadcast dims kept at size 1; the kernels read them with
    stride 0), or None."""
    return None if blk.call.mask is None else blk.call.mask.to(blk.call.cdt)


def _common(blk):
    """The arguments every kernel call ends with: (b, h0, h, scale, dropout_p, seed)."""
    call = blk.call
    return (blk.b, blk.hs.start, blk.hs.stop - blk.hs.start, float(call.scale), float(call.dropout_p),
            seed64(call.seed))


def _row_order(win, b):
    """Rows of batch element ``b`` sorted by their first window key (cached on the index): consecutive queries
    then share window keys, which stay in cache."""
    cache = win._cache.setdefault("fused_order", {})
    if b not in cache:
        crow, col = win.rows_of(b)
        first = torch.where(crow[1:] > crow[:-1], col[crow[:-1].clamp(max=max(col.numel() - 1, 0))],
                            torch.full_like(crow[:-1], -1)) if col.numel() else torch.zeros_like(crow[:-1])
        cache[b] = torch.argsort(first, stable=True)
    return cache[b]


class FusedCPUBackend(Backend):
    """The fused C++/OpenMP kernels: one call per batch element and block of heads."""

    name = "fused"
    supports = Supports(devices=("cpu",), max_head_dim=MAX_HEAD_DIM, saves={"correction": None, "window": "lse"},
                        auto_rank={"cpu": 0})
    #: heads per call: the per-head bias gradient of a call is ``[heads, n]``, so blocks of 2 keep it small
    #: (each call still runs (head, query) pairs in parallel)
    head_block = 2

    def available(self):
        ext, why = extension()
        return ext is not None, why

    @staticmethod
    def _ebias(blk, n):
        """``expm1(bias)`` ``[n, 1]`` (shared) or ``[n, h]`` (per head), vectorised once per block."""
        if blk.bvals is None:
            return torch.zeros(n, 1, dtype=blk.call.cdt)
        return torch.expm1(blk.bvals.t()).contiguous()

    def forward_block(self, win, blk, qkv, lse, state, totals):
        crow, col = win.rows_of(blk.b)                           # the forward needs no transposed structure
        if not col.numel():
            return
        den, out = totals
        outc, denc = out.contiguous(), den.contiguous()        # [h, Q, D], [h, Q]: copied back if strided
        extension()[0].window_forward(*qkv, lse.contiguous(), crow, col, _row_order(win, blk.b),
                                      self._ebias(blk, col.numel()), _mask(blk), *_common(blk), denc, outc)
        for buf, dst in ((outc, out), (denc, den)):
            if buf.data_ptr() != dst.data_ptr():
                dst.copy_(buf)

    def backward_block(self, win, blk, qkv, upstream, state, grads):
        crow, col, tcrow, trow, perm = win.csr(blk.b)
        h = blk.hs.stop - blk.hs.start
        db = torch.empty(h, col.numel(), dtype=blk.call.cdt)
        if not col.numel():
            return db
        (gp, go), (_, lse), (dq, dk, dv) = upstream, state, grads
        eb = self._ebias(blk, col.numel())
        dqc = dq.contiguous()                                    # [h, Q, D]: small; copied back if it was strided
        extension()[0].window_backward(*qkv, lse.contiguous(), gp[blk.b, blk.hs].contiguous(), go.contiguous(),
                                       crow, col, _row_order(win, blk.b), tcrow, trow, eb, eb[perm].contiguous(),
                                       None, None, False, _mask(blk), *_common(blk), dqc, dk, dv, db)
        if dqc.data_ptr() != dq.data_ptr():
            dq.copy_(dqc)
        return db

    # window attention (the local attention mask): the state kept for the backward is the window log-sum-exp

    def window_forward_block(self, win, blk, qkv, state, out):
        """``state`` is this backend's: the window log-sum-exp ``[h, Q]`` (``-inf`` for an empty window)."""
        crow, col = win.rows_of(blk.b)
        if not col.numel():
            state.fill_(float("-inf"))
            return
        sbias = None if blk.bvals is None else blk.bvals.t().contiguous()
        extension()[0].attention_forward(*qkv, crow, col, _row_order(win, blk.b), sbias, _mask(blk), *_common(blk),
                                         state, out)

    def window_backward_block(self, win, blk, qkv, upstream, state, grads):
        """``state`` is the window log-sum-exp ``[h, Q]`` of `window_forward_block`."""
        crow, col, tcrow, trow, perm = win.csr(blk.b)
        h = blk.hs.stop - blk.hs.start
        cdt = blk.call.cdt
        db = torch.zeros(h, col.numel(), dtype=cdt)      # empty / fully masked windows: zero
        if not col.numel():
            return db
        (g, go), (dq, dk, dv) = upstream, grads
        sbias = None if blk.bvals is None else blk.bvals.t().contiguous()
        unused = torch.zeros(1, 1, dtype=cdt)
        dqc = dq.contiguous()
        extension()[0].window_backward(*qkv, state.contiguous(), g[blk.b, blk.hs].contiguous(), go.contiguous(),
                                       crow, col, _row_order(win, blk.b), tcrow, trow, unused, unused, sbias,
                                       None if sbias is None else sbias[perm].contiguous(), True, _mask(blk),
                                       *_common(blk), dqc, dk, dv, db)
        if dqc.data_ptr() != dq.data_ptr():
            dq.copy_(dqc)
        return db
