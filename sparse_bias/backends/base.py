"""The window terms of one (batch element, head block), written once on top of the backend primitives, and what a
backend declares about itself.

Two uses: the sparse *correction* of `sparse_bias.sparse_bias_attention` (``forward_block`` /
``backward_block``) and the local-mask softmax of `sparse_bias.window_attention`
(``window_forward_block`` / ``window_backward_block``). Tensors travel in small groups: ``qkv = (q, k, v)``
``[B, H, Q|K, D]``; ``upstream = (g, go)`` (the output gradient and ``<g, o>``); ``grads = (dq, dk, dv)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, Optional, Tuple

import torch

from .._call import Call
from ..dense.dropout import dropout_scale

__all__ = ["WindowBlock", "Backend", "Supports", "entry_mask", "OPS"]

#: the operations a backend can evaluate the window terms of
OPS = ("correction", "window")
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Supports:
    """What a backend declares it can do; `Backend.can_run` and the registry (`sparse_bias.backends`) read it.

    Attributes:
        ops: operations it evaluates (``"correction"``, ``"window"``).
        devices: device types it runs on (None = any).
        dtypes: input dtypes it takes.
        max_head_dim: the largest head dim (None = any).
        saves: per operation, what its forward keeps for the backward: ``"p"`` (the window probabilities
            ``[H, nnz]``), ``"lse"`` (the window log-sum-exp ``[B, H, Q]``; probabilities recomputed) or ``None``
            (nothing beyond what the operation keeps anyway).
        auto_rank: per device type, its place in ``"auto"``'s order (lower first; absent = not tried there;
            ``"other"`` for device types not named).
    """

    ops: Tuple[str, ...] = OPS
    devices: Optional[Tuple[str, ...]] = ("cpu", "cuda")
    dtypes: Tuple[torch.dtype, ...] = _FLOATS
    max_head_dim: Optional[int] = None
    saves: Dict[str, Optional[str]] = field(default_factory=lambda: {"correction": "p", "window": "p"})
    auto_rank: Dict[str, int] = field(default_factory=dict)


def entry_mask(mask: torch.Tensor, b: int, hs: slice, local_q: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``[h or 1, n]``: the additive mask at the window entries of batch element ``b`` (no dense expansion)."""
    m = mask[b if mask.shape[0] > 1 else 0]                                 # [H|1, Q|1, K|1]
    m = m[hs] if m.shape[0] > 1 else m
    q = local_q if m.shape[1] > 1 else torch.zeros_like(local_q)
    k = key if m.shape[2] > 1 else torch.zeros_like(key)
    return m[:, q, k]


@dataclass
class WindowBlock:
    """The window entries of batch element ``b`` for the heads ``hs`` (``h`` heads, ``n`` entries).

    Attributes:
        b: batch element.
        hs: slice of heads.
        e0, e1: the entries ``e0:e1`` of the `sparse_bias.WindowIndex` (all of ``b``'s).
        row: LongTensor ``[n]``, the CSR row (``b * Q + q``) of each entry (a view of the index's cache).
        key: LongTensor ``[n]``, the key of each entry.
        bvals: bias values ``[h or 1, n]`` in the compute dtype, or None.
        call: the call record (`sparse_bias._call.Call`: scale, additive mask, dropout, seed, compute dtype).
        shape: ``(B, H, Q, K)`` of the score tensor (dropout decisions index it).

    ``emask`` and ``keep`` (the mask and the dropout multipliers at the entries, ``[h or 1, n]``) are computed
    on first use: fused backends read ``call.mask`` and ``call.seed`` directly and never materialise them.
    """

    b: int
    hs: slice
    e0: int
    e1: int
    row: torch.Tensor
    key: torch.Tensor
    bvals: Optional[torch.Tensor]
    call: Call
    shape: Tuple[int, int, int, int]

    @property
    def num_queries(self) -> int:
        return self.shape[2]

    @cached_property
    def local_q(self) -> torch.Tensor:
        """LongTensor ``[n]``: the query of each entry (``0 <= q < Q``); computed on first use."""
        return self.row - self.b * self.num_queries

    @cached_property
    def emask(self) -> Optional[torch.Tensor]:
        """``[h or 1, n]``: the additive mask at the entries, or None."""
        mask = self.call.mask
        return None if mask is None else entry_mask(mask, self.b, self.hs, self.local_q, self.key)

    @cached_property
    def keep(self) -> Optional[torch.Tensor]:
        """``[h, n]``: dropout multipliers ``keep / (1 - p)`` at the entries, or None without dropout."""
        call = self.call
        if call.dropout_p <= 0:
            return None
        h = torch.arange(self.hs.start, self.hs.stop, device=self.row.device).unsqueeze(1)
        return dropout_scale(call.seed, call.dropout_p, (self.b, h, self.local_q, self.key), self.shape, call.cdt)


class Backend:
    """Base class: the four block methods built on ``sddmm``, ``spmm`` and ``spmm_t`` (see
    `sparse_bias.backends`). A backend with fused kernels overrides the block methods; every backend declares
    what it supports (`Supports`) and, through `available`, whether its dependencies are present."""

    name = "base"
    supports = Supports()
    #: heads per block (None = all)
    head_block = None
    #: whether the backward needs contiguous dq / dk / dv buffers
    needs_contiguous = False

    #: what `available` reports when the backend can run
    description = "the backend primitives"

    def available(self) -> Tuple[bool, str]:
        """``(ok, why)``: whether the backend's dependencies (extension, package) are present here."""
        return True, self.description

    def saves(self, op: str) -> Optional[str]:
        """What the forward of ``op`` keeps for the backward (`Supports.saves`)."""
        return self.supports.saves.get(op)

    def can_run(self, device, dtype, head_dim=None, op: Optional[str] = None) -> Tuple[bool, str]:
        """``(ok, why)``: whether this backend runs ``op`` on ``device`` / ``dtype`` / ``head_dim`` (None: not
        checked) -- the declared `Supports` first, then `available`."""
        sup = self.supports
        if op is not None and op not in sup.ops:
            return False, f"no {op} kernels"
        if sup.devices is not None and torch.device(device).type not in sup.devices:
            return False, f"runs on {' / '.join(sup.devices)}, got {torch.device(device).type}"
        if dtype not in sup.dtypes:
            return False, f"takes {' / '.join(str(d).replace('torch.', '') for d in sup.dtypes)} inputs, got {dtype}"
        if head_dim is not None and sup.max_head_dim is not None and head_dim > sup.max_head_dim:
            return False, f"takes head dims up to {sup.max_head_dim}, got {head_dim}"
        return self.available()

    # Segment reductions over each query's entries (CSR rows). Measured on [1, 211k] entries, 900 rows (CPU):
    # max -- scatter_reduce 0.16 ms, torch-scatter segment_csr 0.21 ms, torch.segment_reduce 0.53 ms;
    # sum -- torch.segment_reduce 0.12 ms, index_add_ 0.53 ms, segment_csr 0.57 ms. The scatter backend
    # overrides both with segment_csr.

    def segment_max(self, win, blk: WindowBlock, vals):
        """``[h, Q]``: the maximum of ``vals [h, n]`` over each query's entries (``-inf`` for none)."""
        out = torch.full((vals.shape[0], win.num_queries), float("-inf"), dtype=vals.dtype, device=vals.device)
        return out.scatter_reduce_(1, blk.local_q.expand_as(vals), vals, reduce="amax", include_self=True)

    def segment_sum(self, win, blk: WindowBlock, vals):
        """``[h, Q]``: the sum of ``vals [h, n]`` over each query's entries (0 for none)."""
        nq = win.num_queries
        offsets = win.indptr[blk.b * nq:(blk.b + 1) * nq + 1] - blk.e0
        return torch.segment_reduce(vals, "sum", offsets=offsets.expand(vals.shape[0], -1), axis=1)

    # window attention: softmax over each query's entries only

    def window_forward_block(self, win, blk: WindowBlock, qkv, state, out):
        """Local-mask attention of one block: ``p = softmax`` over each query's entries of
        ``scale <q, k_j> + bias_j + mask_j``, written into ``state [h, n]``; ``sum_j p_j keep_j v_j`` into
        ``out [h, Q, D]``. A query without an unmasked entry gets ``p = 0`` (a zero output)."""
        q, k, v = qkv
        cdt = blk.call.cdt
        s = self.sddmm(win, blk.b, blk.hs, q, k, cdt).mul_(blk.call.scale)
        if blk.bvals is not None:
            s += blk.bvals
        if blk.emask is not None:
            s += blk.emask
        m = self.segment_max(win, blk, s)
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)                     # empty / masked rows
        s -= m[:, blk.local_q]
        e = s.exp_()
        den = self.segment_sum(win, blk, e)
        inv = torch.where(den == 0, torch.zeros_like(den), 1.0 / den)
        torch.mul(e, inv[:, blk.local_q], out=state)
        out += self.spmm(win, blk.b, blk.hs, state if blk.keep is None else state * blk.keep, v, cdt)

    def window_backward_block(self, win, blk: WindowBlock, qkv, upstream, state, grads):
        """Backward of `window_forward_block`: ``upstream = (g [B, H, Q, D], go = <g, o> [h, Q])``, ``state``
        the probabilities ``[h, n]``, ``grads = (dq [h, Q, D] (a slice), dk, dv [B, H, K, D])``.

        With ``ds_j = p_j (keep_j <g, v_j> - <g, o>)``: adds ``scale sum_j ds_j k_j`` into ``dq``,
        ``scale ds_j q`` and ``p_j keep_j g`` into ``dk``, ``dv``; returns ``ds [h, n]`` (the gradient of the bias
        values).
        """
        (q, k, v), (g, go), (dq, dk, dv), p = qkv, upstream, grads, state
        cdt, scale = blk.call.cdt, blk.call.scale
        self.spmm_t(win, blk.b, blk.hs, p if blk.keep is None else p * blk.keep, g, dv, cdt)
        diff = self.sddmm(win, blk.b, blk.hs, g, v, cdt)                                 # <g, v_j>
        if blk.keep is not None:
            diff.mul_(blk.keep)
        diff.sub_(go[:, blk.local_q])
        ds = diff.mul_(p)
        dq += self.spmm(win, blk.b, blk.hs, ds, k, cdt) * scale
        self.spmm_t(win, blk.b, blk.hs, ds * scale, q, dk, cdt)
        return ds

    # the sparse correction of sparse_bias_attention

    def forward_block(self, win, blk: WindowBlock, qkv, lse, state, totals):
        """Window terms of the correction for one block.

        ``lse [h, Q]`` (as `sparse_bias.dense.kernel_lse` gives it); writes ``p_j = exp(s_j - L)`` into
        ``state [h, n]`` (backends whose correction saves ``"p"``; None for the others); ``totals = (den [h, Q],
        out [h, Q, D])``: adds ``S`` into ``den`` and ``C`` into ``out``.
        """
        q, k, v = qkv
        den, out = totals
        cdt = blk.call.cdt
        s = self.sddmm(win, blk.b, blk.hs, q, k, cdt).mul_(blk.call.scale)                # s_j
        if blk.emask is not None:
            s += blk.emask
        s -= lse[:, blk.local_q]
        torch.exp(s, out=state)                                                           # p_j
        del s
        a = state * torch.expm1(blk.bvals)                                                # a_j
        den.index_add_(1, blk.local_q, a)                                                 # S
        out += self.spmm(win, blk.b, blk.hs, a if blk.keep is None else a * blk.keep, v, cdt)   # C

    def backward_block(self, win, blk: WindowBlock, qkv, upstream, state, grads):
        """Window terms of the backward for one block.

        ``upstream = (gp, go)``: ``gp = g / (1 + S)`` ``[B, H, Q, D]`` and ``go = <g', o>`` ``[h, Q]``; ``state =
        (p [h, n] or None, lse [h, Q])``; ``grads = (dq [h, Q, D] (a slice), dk, dv [B, H, K, D])``, added into.
        Returns the bias gradient ``[h, n]``.
        """
        (q, k, v), (gp, go), (p, _), (dq, dk, dv) = qkv, upstream, state, grads
        b, hs, cdt, scale = blk.b, blk.hs, blk.call.cdt, blk.call.scale
        a = p * torch.expm1(blk.bvals)
        self.spmm_t(win, b, hs, a if blk.keep is None else a * blk.keep, gp, dv, cdt)    # dv_j += a_j g'
        diff = self.sddmm(win, b, hs, gp, v, cdt)                                          # <g', v_j>
        if blk.keep is not None:
            diff.mul_(blk.keep)
        diff.sub_(go[:, blk.local_q])                                                      # - <g', o>
        d = a.mul_(diff)                                                                   # d_j = a_j (...)
        dq += self.spmm(win, b, hs, d, k, cdt) * scale
        self.spmm_t(win, b, hs, d.mul_(scale), q, dk, cdt)
        return diff.mul_(p).add_(d, alpha=1.0 / scale)                                     # p_j e^b_j (...)
