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

import os
from functools import lru_cache

import torch

from .base import Backend

#: the compiled kernels keep a query row in registers (``kMaxHeadDim`` in csrc/window_terms.cpp)
MAX_HEAD_DIM = 512


@lru_cache(maxsize=None)
def _extension():
    """The compiled module, or None (and why) when it is missing."""
    if os.environ.get("SPARSE_BIAS_NO_EXT") == "1":
        return None, "disabled by SPARSE_BIAS_NO_EXT=1"
    try:
        from .. import _C
    except ImportError as exc:
        return None, f"the compiled extension sparse_bias._C is not built ({exc}); reinstall with `make install`"
    return _C, "fused C++/OpenMP kernels (sparse_bias._C)"


def extension_available() -> bool:
    """True when the fused CPU kernels (``sparse_bias._C``) can be used."""
    return _extension()[0] is not None


def _mask(blk, cdt):
    """The additive mask, 4-D in the compute dtype (broadcast dims kept at size 1; the kernels read them with
    stride 0), or None."""
    return None if blk.mask is None else blk.mask.to(cdt)


def _seed(blk) -> int:
    """The dropout seed as the kernels take it (`sparse_bias.kernels.seed64`)."""
    from ..kernels import seed64
    return seed64(blk.seed)


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
    """The fused C++/OpenMP kernels: one call per batch element for all heads."""

    name = "fused"
    #: heads per call: the per-head bias gradient of a call is ``[heads, n]``, so blocks of 2 keep it small
    #: (each call still runs (head, query) pairs in parallel)
    head_block = 2
    saves_p = False

    def can_run(self, device, dtype, head_dim=None):
        ext, why = _extension()
        if ext is None:
            return False, why
        if device.type != "cpu":
            return False, f"CPU kernels, got {device.type}"
        if dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            return False, f"no fused kernel for {dtype}"
        if head_dim is not None and head_dim > MAX_HEAD_DIM:
            return False, f"the fused kernels take head dims up to {MAX_HEAD_DIM}, got {head_dim}"
        return True, why

    @staticmethod
    def _rows(t):
        return t if t.stride(-1) == 1 else t.contiguous()

    def _ebias(self, blk, cdt, n):
        """``expm1(bias)`` ``[n, 1]`` (shared) or ``[n, h]`` (per head), vectorised once per block."""
        if blk.bvals is None:
            return torch.zeros(n, 1, dtype=cdt)
        return torch.expm1(blk.bvals.t()).contiguous()

    def forward_block(self, win, blk, q, k, v, lse, scale, p_out, den, out, cdt):
        ext = _extension()[0]
        crow, col = win.rows_of(blk.b)                           # the forward needs no transposed structure
        if not col.numel():
            return
        h = blk.hs.stop - blk.hs.start
        bv = self._ebias(blk, cdt, col.numel())
        outc, denc = out.contiguous(), den.contiguous()        # [h, Q, D], [h, Q]: copied back if strided
        ext.window_forward(self._rows(q), self._rows(k), self._rows(v), lse.contiguous(), crow, col,
                           _row_order(win, blk.b), bv, _mask(blk, cdt), blk.b, blk.hs.start, h, float(scale),
                           float(blk.dropout_p), _seed(blk), denc, outc)
        for buf, dst in ((outc, out), (denc, den)):
            if buf.data_ptr() != dst.data_ptr():
                dst.copy_(buf)

    def backward_block(self, win, blk, q, k, v, gp, go, p, lse, scale, dq, dk, dv, cdt):
        ext = _extension()[0]
        crow, col, tcrow, trow, perm = win.csr(blk.b)
        h = blk.hs.stop - blk.hs.start
        db = torch.empty(h, col.numel(), dtype=cdt)
        if not col.numel():
            return db
        eb = self._ebias(blk, cdt, col.numel())
        gpb = gp[blk.b, blk.hs].contiguous()
        dqc = dq.contiguous()                                    # [h, Q, D]: small; copied back if it was strided
        ext.window_backward(self._rows(q), self._rows(k), self._rows(v), lse.contiguous(), gpb, go.contiguous(),
                            crow, col, _row_order(win, blk.b), tcrow, trow, eb, eb[perm].contiguous(), None, None,
                            False, _mask(blk, cdt), blk.b,
                            blk.hs.start, h, float(scale), float(blk.dropout_p), _seed(blk),
                            dqc, dk, dv, db)
        if dqc.data_ptr() != dq.data_ptr():
            dq.copy_(dqc)
        return db

    # window attention (the local attention mask): the state kept for the backward is the window log-sum-exp

    def window_forward_block(self, win, blk, q, k, v, scale, p_out, out, cdt):
        """``p_out`` is this backend's state: the window log-sum-exp ``[h, Q]`` (``-inf`` for an empty window)."""
        ext = _extension()[0]
        crow, col = win.rows_of(blk.b)
        h = blk.hs.stop - blk.hs.start
        if not col.numel():
            p_out.fill_(float("-inf"))
            return
        sbias = None if blk.bvals is None else blk.bvals.t().contiguous()
        ext.attention_forward(self._rows(q), self._rows(k), self._rows(v), crow, col, _row_order(win, blk.b), sbias,
                              _mask(blk, cdt), blk.b, blk.hs.start, h, float(scale), float(blk.dropout_p),
                              _seed(blk), p_out, out)

    def window_backward_block(self, win, blk, q, k, v, g, go, p, scale, dq, dk, dv, cdt):
        """``p`` is the window log-sum-exp ``[h, Q]`` of `window_forward_block`."""
        ext = _extension()[0]
        crow, col, tcrow, trow, perm = win.csr(blk.b)
        h = blk.hs.stop - blk.hs.start
        db = torch.zeros(h, col.numel(), dtype=cdt)      # empty / fully masked windows: zero
        if not col.numel():
            return db
        sbias = None if blk.bvals is None else blk.bvals.t().contiguous()
        unused = torch.zeros(1, 1, dtype=cdt)
        dqc = dq.contiguous()
        ext.window_backward(self._rows(q), self._rows(k), self._rows(v), p.contiguous(),
                            g[blk.b, blk.hs].contiguous(), go.contiguous(), crow, col, _row_order(win, blk.b), tcrow,
                            trow, unused, unused, sbias, None if sbias is None else sbias[perm].contiguous(), True,
                            _mask(blk, cdt), blk.b, blk.hs.start, h, float(scale), float(blk.dropout_p),
                            _seed(blk), dqc, dk, dv, db)
        if dqc.data_ptr() != dq.data_ptr():
            dq.copy_(dqc)
        return db
