"""Fused CPU kernels for the window terms: the compiled extension ``sparse_bias._C``.

Built at install time against the installed torch (``setup.py``, ``torch.utils.cpp_extension``, OpenMP), as
torch-scatter is. Per batch element and block of heads: the forward makes one pass over each query's entries
(scores, ``p``, ``a``, ``S``, ``C``); the backward one pass over each query's entries (``<g', v_j>``, ``d_j``, the
``dq`` correction and the bias gradient) and one over each key's entries through the transposed structure the
`sparse_bias.WindowIndex` caches (``dk`` / ``dv``), so every output is written by one thread in a fixed
order: bitwise-repeatable, for any thread count. A kernel call splits its items over threads only when it holds
more than ``sparse_bias._C.MIN_WORK_PER_THREAD`` multiply-adds (small calls run on the calling thread).
``p`` is recomputed in the backward instead of stored. Masks and dropout are read
from the additive mask and the seed inside the kernels (never materialised per entry).

When the extension is missing (not built, or ``SPARSE_BIAS_NO_EXT=1`` at run time) the backend cannot run and
``"auto"`` falls back to the pure-PyTorch backends.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._core.extension import extension, extension_available
from ..dense.dropout import seed64
from .base import Backend, Supports

__all__ = ["FusedCPUBackend", "extension_available", "MAX_HEAD_DIM"]

#: the compiled kernels keep a query row in registers (``kMaxHeadDim`` in csrc/window_terms.cpp)
MAX_HEAD_DIM = 512


def _mask(blk):
    """The additive mask, 4-D in the compute dtype (broadcast dims kept at size 1; the kernels read them with
    stride 0), or None."""
    return None if blk.call.mask is None else blk.call.mask.to(blk.call.cdt)


def _common(blk, b):
    """The arguments every kernel call ends with: (b, h0, h, scale, dropout_p, seed)."""
    call = blk.call
    return (b, blk.hs.start, blk.heads, float(call.scale), float(call.dropout_p), seed64(call.seed))


#: per index (keyed weakly by its ``key`` tensor): the structures of `_batches`, computed once
_PER_BATCH = WeakIdKeyDictionary()


def _batches(ent):
    """Per batch element with entries: ``(b, rows, entries, structure)`` -- ``rows`` / ``entries`` the slices of its
    rows and entries, ``structure = (crow, col, order, tcrow, trow, perm)`` shifted to the element's own numbering.
    CPU only, so reading the entry offsets from ``indptr`` costs no device synchronisation. Computed once per index
    (the kernels run once per block of heads)."""
    cached = _PER_BATCH.get(ent.key)
    if cached is None or cached[0] is not ent.indptr:
        cached = _PER_BATCH[ent.key] = (ent.indptr, list(_split(ent)))
    return cached[1]


def _split(ent):
    nq, nk = ent.queries, ent.keys
    offsets = ent.indptr[::nq].tolist() if nq else [0] * (ent.batch + 1)
    for b in range(ent.batch):
        e0, e1 = offsets[b], offsets[b + 1]
        if e1 == e0:
            continue
        rows = slice(b * nq, (b + 1) * nq)
        crow = ent.indptr[b * nq:(b + 1) * nq + 1] - e0
        yield b, rows, slice(e0, e1), (crow, ent.key[e0:e1], ent.order[rows] - b * nq,
                                       ent.tcrow[b * nk:(b + 1) * nk + 1] - e0, ent.trow[e0:e1] - b * nq,
                                       ent.perm[e0:e1] - e0)


class FusedCPUBackend(Backend):
    """The fused C++/OpenMP kernels: one call per batch element and block of heads."""

    name = "fused"
    supports = Supports(devices=("cpu",), max_head_dim=MAX_HEAD_DIM, saves={"correction": None, "window": "lse"},
                        auto_rank={"cpu": 0})
    #: heads per call: the per-head bias gradient of a call is ``[heads, n]``, so blocks of 2 keep it small
    #: (each call still splits its (head, query) pairs over threads when they hold enough work: csrc/parallel.h)
    head_block = 2

    def available(self):
        ext, why = extension()
        return ext is not None, why

    @staticmethod
    def _ebias(blk):
        """``expm1(bias)`` ``[nnz, 1]`` (shared) or ``[nnz, h]`` (per head), vectorised once per block."""
        if blk.bvals is None:
            return torch.zeros(blk.ent.nnz, 1, dtype=blk.call.cdt)
        return torch.expm1(blk.bvals.t()).contiguous()

    # Per batch element, the kernels write into contiguous [h, Q(, D)] buffers: the rows of the head-major
    # totals (strided slices of [h, B * Q(, D)]) are copied in and back.

    def forward_block(self, blk, qkv, lse, state, totals):
        den, removed, out = totals
        eb = self._ebias(blk)
        mask = _mask(blk)
        for b, rows, ents, (crow, col, order, _, _, _) in _batches(blk.ent):
            denc, remc, outc = den[:, rows].contiguous(), removed[:, rows].contiguous(), out[:, rows].contiguous()
            extension()[0].correction_forward(*qkv, lse[:, rows].contiguous(), crow, col, order, eb[ents], mask,
                                              *_common(blk, b), denc, remc, outc)
            den[:, rows], removed[:, rows], out[:, rows] = denc, remc, outc

    def backward_block(self, blk, qkv, upstream, state, grads):
        (gp, go), (_, lse), (dq, dk, dv) = upstream, state, grads
        db = torch.zeros(blk.heads, blk.ent.nnz, dtype=blk.call.cdt)
        eb = self._ebias(blk)
        mask = _mask(blk)
        for b, rows, ents, (crow, col, order, tcrow, trow, perm) in _batches(blk.ent):
            ebb, dqc = eb[ents], dq[:, rows].contiguous()
            dbb = torch.empty(blk.heads, ents.stop - ents.start, dtype=blk.call.cdt)
            extension()[0].correction_backward(*qkv, lse[:, rows].contiguous(), gp[b, blk.hs].contiguous(),
                                               go[:, rows].contiguous(), crow, col, order, tcrow, trow, ebb,
                                               ebb[perm].contiguous(), mask, *_common(blk, b), dqc, dk, dv, dbb)
            dq[:, rows], db[:, ents] = dqc, dbb
        return db.mul_(torch.exp(blk.bvals))                        # p e^b (...): e^b, never 1 + expm1(b)

    # window attention (the local attention mask): the state kept for the backward is the window log-sum-exp

    def window_forward_block(self, blk, qkv, state, out):
        """``state`` is this backend's: the window log-sum-exp ``[h, B * Q]`` (``-inf`` for an empty window)."""
        state.fill_(float("-inf"))
        sbias = None if blk.bvals is None else blk.bvals.t().contiguous()
        mask = _mask(blk)
        for b, rows, ents, (crow, col, order, _, _, _) in _batches(blk.ent):
            st, outc = state[:, rows].contiguous(), out[:, rows].contiguous()
            extension()[0].window_attention_forward(*qkv, crow, col, order,
                                                    None if sbias is None else sbias[ents], mask, *_common(blk, b),
                                                    st, outc)
            state[:, rows], out[:, rows] = st, outc

    def window_backward_block(self, blk, qkv, upstream, state, grads):
        """``state`` is the window log-sum-exp ``[h, B * Q]`` of `window_forward_block`."""
        cdt = blk.call.cdt
        (g, go), (dq, dk, dv) = upstream, grads
        db = torch.zeros(blk.heads, blk.ent.nnz, dtype=cdt)      # empty / fully masked windows: zero
        sbias = None if blk.bvals is None else blk.bvals.t().contiguous()
        mask = _mask(blk)
        for b, rows, ents, (crow, col, order, tcrow, trow, perm) in _batches(blk.ent):
            sb = None if sbias is None else sbias[ents]
            dqc = dq[:, rows].contiguous()
            dbb = torch.zeros(blk.heads, ents.stop - ents.start, dtype=cdt)
            extension()[0].window_attention_backward(*qkv, state[:, rows].contiguous(), g[b, blk.hs].contiguous(),
                                                     go[:, rows].contiguous(), crow, col, order, tcrow, trow, sb,
                                                     None if sb is None else sb[perm].contiguous(), mask,
                                                     *_common(blk, b), dqc, dk, dv, dbb)
            dq[:, rows], db[:, ents] = dqc, dbb
        return db
