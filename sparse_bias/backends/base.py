"""The window terms of one (batch element, head block), written once on top of the backend primitives.

Two uses: the sparse *correction* of `sparse_bias.sparse_bias_attention` (``forward_block`` /
``backward_block``) and the local-mask softmax of `sparse_bias.window_attention`
(``window_forward_block`` / ``window_backward_block``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import torch


@dataclass
class WindowBlock:
    """The window entries of batch element ``b`` for the heads ``hs`` (``h`` heads, ``n`` entries).

    Attributes:
        b: batch element.
        hs: slice of heads.
        e0, e1: the entries ``e0:e1`` of the `sparse_bias.WindowIndex` (all of ``b``'s).
        row: LongTensor ``[n]``, the CSR row (``b * Q + q``) of each entry (a view of the index's cache).
        bvals: bias values ``[h or 1, n]`` in the compute dtype, or None.
        mask: the additive mask, 4-D broadcastable to ``[B, H, Q, K]`` (``-inf`` = masked), or None.
        dropout_p, seed: attention dropout and the seed of its counter-hash keep decisions.
        num_heads, num_queries, num_keys: ``H``, ``Q``, ``K`` (dropout decisions index the ``[B, H, Q, K]`` scores).
        key: LongTensor ``[n]``, the key of each entry.
        cdt: the compute dtype.

    ``emask`` and ``keep`` (the mask and the dropout multipliers at the entries, ``[h or 1, n]``) are computed
    on first use: fused backends read ``mask`` and ``seed`` directly and never materialise them.
    """

    b: int
    hs: slice
    e0: int
    e1: int
    row: torch.Tensor
    bvals: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    seed: int = 0
    num_heads: int = 1
    num_queries: int = 0
    num_keys: int = 0
    key: Optional[torch.Tensor] = None
    cdt: torch.dtype = torch.float32

    @cached_property
    def local_q(self) -> torch.Tensor:
        """LongTensor ``[n]``: the query of each entry (``0 <= q < Q``); computed on first use."""
        return self.row - self.b * self.num_queries

    @cached_property
    def emask(self) -> Optional[torch.Tensor]:
        """``[h or 1, n]``: the additive mask at the entries, or None."""
        from .._validation import entry_mask
        return None if self.mask is None else entry_mask(self.mask, self.b, self.hs, self.local_q, self.key)

    @cached_property
    def keep(self) -> Optional[torch.Tensor]:
        """``[h, n]``: dropout multipliers ``keep / (1 - p)`` at the entries, or None without dropout."""
        if self.dropout_p <= 0:
            return None
        from ..kernels import dropout_scale
        h = torch.arange(self.hs.start, self.hs.stop, device=self.row.device).unsqueeze(1)
        return dropout_scale(self.seed, self.dropout_p, self.b, h, self.local_q, self.key, self.num_heads,
                             self.num_queries, self.num_keys, self.cdt)


class Backend:
    """Base class: `forward_block` and `backward_block` built on ``sddmm``, ``spmm`` and ``spmm_t``
    (see `sparse_bias.backends`). A backend with fused kernels overrides the two block methods."""

    name = "base"
    #: heads per block (None = all)
    head_block = None
    #: whether the backward needs contiguous dq / dk / dv buffers
    needs_contiguous = False
    #: whether the forward writes ``p`` for the backward (fused backends recompute it instead)
    saves_p = True

    def can_run(self, device, dtype, head_dim=None):  # pragma: no cover - abstract
        """``(ok, why)``: whether this backend runs on ``device`` / ``dtype`` (and head dim, when given)."""
        raise NotImplementedError

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

    def window_forward_block(self, win, blk: WindowBlock, q, k, v, scale, p_out, out, cdt):
        """Local-mask attention of one block: ``p = softmax`` over each query's entries of
        ``scale <q, k_j> + bias_j + mask_j``, written into ``p_out [h, n]``; ``sum_j p_j keep_j v_j`` into
        ``out [h, Q, D]``. A query without an unmasked entry gets ``p = 0`` (a zero output)."""
        s = self.sddmm(win, blk.b, blk.hs, q, k, cdt).mul_(scale)
        if blk.bvals is not None:
            s += blk.bvals
        if blk.emask is not None:
            s += blk.emask
        m = self.segment_max(win, blk, s)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))                        # empty / masked rows
        s -= m[:, blk.local_q]
        e = s.exp_()
        den = self.segment_sum(win, blk, e)
        inv = torch.where(den > 0, 1.0 / den, torch.zeros_like(den))
        torch.mul(e, inv[:, blk.local_q], out=p_out)
        out += self.spmm(win, blk.b, blk.hs, p_out if blk.keep is None else p_out * blk.keep, v, cdt)

    def window_backward_block(self, win, blk: WindowBlock, q, k, v, g, go, p, scale, dq, dk, dv, cdt):
        """Backward of `window_forward_block`: ``g [B, H, Q, D]``, ``go = <g, o>`` ``[h, Q]``, ``p [h, n]``.

        With ``ds_j = p_j (keep_j <g, v_j> - <g, o>)``: adds ``scale sum_j ds_j k_j`` into ``dq [h, Q, D]``,
        ``scale ds_j q`` and ``p_j keep_j g`` into ``dk``, ``dv [B, H, K, D]``; returns ``ds [h, n]`` (the
        gradient of the bias values).
        """
        self.spmm_t(win, blk.b, blk.hs, p if blk.keep is None else p * blk.keep, g, dv, cdt)
        diff = self.sddmm(win, blk.b, blk.hs, g, v, cdt)                                 # <g, v_j>
        if blk.keep is not None:
            diff.mul_(blk.keep)
        diff.sub_(go[:, blk.local_q])
        ds = diff.mul_(p)
        dq += self.spmm(win, blk.b, blk.hs, ds, k, cdt) * scale
        self.spmm_t(win, blk.b, blk.hs, ds * scale, q, dk, cdt)
        return ds

    def forward_block(self, win, blk: WindowBlock, q, k, v, lse, scale, p_out, den, out, cdt):
        """Window terms of the correction for one block.

        Writes ``p_j = exp(s_j - L)`` into ``p_out [h, n]`` (backends with ``saves_p``; others get None), adds
        ``S`` into ``den [h, Q]`` and ``C`` into ``out [h, Q, D]``; ``lse [h, Q]``.
        """
        s = self.sddmm(win, blk.b, blk.hs, q, k, cdt).mul_(scale)                          # s_j
        if blk.emask is not None:
            s += blk.emask
        s -= lse[:, blk.local_q]
        torch.exp(s, out=p_out)                                                            # p_j
        del s
        a = p_out * torch.expm1(blk.bvals)                                                 # a_j
        den.index_add_(1, blk.local_q, a)                                                  # S
        out += self.spmm(win, blk.b, blk.hs, a if blk.keep is None else a * blk.keep, v, cdt)   # C

    def backward_block(self, win, blk: WindowBlock, q, k, v, gp, go, p, lse, scale, dq, dk, dv, cdt):
        """Window terms of the backward for one block.

        ``gp`` is ``g / (1 + S)`` ``[B, H, Q, D]``, ``go = <g', o>`` ``[h, Q]``, ``p [h, n]`` (from the forward;
        None for backends without ``saves_p``), ``lse [h, Q]``. Adds into ``dq [h, Q, D]`` (a slice) and ``dk``,
        ``dv`` ``[B, H, K, D]``; returns the bias gradient ``[h, n]``.
        """
        b, hs = blk.b, blk.hs
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
