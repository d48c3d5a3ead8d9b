"""The window terms of one block of heads (over every batch element's entries), written once on top of the backend primitives, and what a
backend declares about itself.

Two uses: the sparse *correction* of `sparse_bias.sparse_bias_attention` (``forward_block`` /
``backward_block``) and the local-mask softmax of `sparse_bias.window_attention`
(``window_forward_block`` / ``window_backward_block``). Tensors travel in small groups: ``qkv = (q, k, v)``
``[B, H, Q|K, D]``; ``upstream = (g, go)`` (the output gradient and ``<g, o>``); ``grads = (dq, dk, dv)``. Per-row
statistics and totals are head-major over the global rows ``r = b * Q + q``: ``[h, B * Q]`` and ``[h, B * Q, D]``.
Nothing here reads a device value on the host (no host sync; docs/gpu.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Optional, Tuple

import torch

from .._core.call import Call
from .._core.entries import Entries
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


def entry_mask(mask: torch.Tensor, hs: slice, batch: torch.Tensor, query: torch.Tensor,
               key: torch.Tensor) -> torch.Tensor:
    """``[h or 1, n]``: the additive mask ``[B|1, H|1, Q|1, K|1]`` at the entries ``(batch, query, key)`` (no dense
    expansion; broadcast dims are read at index 0)."""
    m = mask[:, hs] if mask.shape[1] > 1 else mask
    idx = [t if size > 1 else torch.zeros_like(t) for t, size in zip((batch, query, key), (m.shape[0], m.shape[2],
                                                                                          m.shape[3]))]
    return m[idx[0], :, idx[1], idx[2]].t()                                  # [n, h|1] -> [h|1, n]


@dataclass
class WindowBlock:
    """The window entries of every batch element for the heads ``hs`` (``h`` heads, ``nnz`` entries).

    Attributes:
        hs: slice of heads.
        ent: the `sparse_bias._core.entries.Entries` of the index (global rows ``r = b * Q + q``).
        bvals: bias values ``[h or 1, nnz]`` in the compute dtype, or None.
        call: the call record (`sparse_bias._core.call.Call`: scale, additive mask, dropout, seed, compute dtype).
        shape: ``(B, H, Q, K)`` of the score tensor (dropout decisions index it).

    ``batch`` / ``query`` (each entry's batch element and query), ``emask`` and ``keep`` (the mask and the dropout
    multipliers at the entries, ``[h or 1, nnz]``) are computed on first use: fused backends read ``call.mask`` and
    ``call.seed`` directly and never materialise them.
    """

    hs: slice
    ent: Entries
    bvals: Optional[torch.Tensor]
    call: Call
    shape: Tuple[int, int, int, int]

    @property
    def heads(self) -> int:
        return self.hs.stop - self.hs.start

    @cached_property
    def batch(self) -> torch.Tensor:
        """LongTensor ``[nnz]``: the batch element of each entry."""
        return self.ent.entry_batch()

    @cached_property
    def query(self) -> torch.Tensor:
        """LongTensor ``[nnz]``: the query (``0 <= q < Q``) of each entry."""
        return self.ent.row - self.batch * self.ent.queries

    @cached_property
    def emask(self) -> Optional[torch.Tensor]:
        """``[h or 1, nnz]``: the additive mask at the entries, or None."""
        mask = self.call.mask
        return None if mask is None else entry_mask(mask, self.hs, self.batch, self.query, self.ent.key)

    @cached_property
    def keep(self) -> Optional[torch.Tensor]:
        """``[h, nnz]``: dropout multipliers ``keep / (1 - p)`` at the entries, or None without dropout."""
        call = self.call
        if call.dropout_p <= 0:
            return None
        h = torch.arange(self.hs.start, self.hs.stop, device=self.ent.key.device).unsqueeze(1)
        return dropout_scale(call.seed, call.dropout_p, (self.batch, h, self.query, self.ent.key), self.shape,
                             call.cdt)


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

    def not_supported_reasons(self, device, dtype, head_dim=None, op: Optional[str] = None) -> List[str]:
        """Every reason this backend cannot run ``op`` on ``device`` / ``dtype`` / ``head_dim`` (None: not
        checked): the declared `Supports`, then `available`. Empty when it can."""
        sup = self.supports
        device = torch.device(device)
        reasons = []
        if op is not None and op not in sup.ops:
            reasons.append(f"no {op} kernels")
        if sup.devices is not None and device.type not in sup.devices:
            reasons.append(f"runs on {' / '.join(sup.devices)}, got {device.type}")
        if dtype not in sup.dtypes:
            reasons.append(f"takes {' / '.join(str(d).replace('torch.', '') for d in sup.dtypes)} inputs, got {dtype}")
        if head_dim is not None and sup.max_head_dim is not None and head_dim > sup.max_head_dim:
            reasons.append(f"takes head dims up to {sup.max_head_dim}, got {head_dim}")
        ok, why = self.available()
        return reasons if ok else reasons + [why]

    def can_run(self, device, dtype, head_dim=None, op: Optional[str] = None) -> Tuple[bool, str]:
        """``(ok, why)``: whether this backend runs ``op`` here; ``why`` joins `not_supported_reasons` (or says
        what runs)."""
        reasons = self.not_supported_reasons(device, dtype, head_dim, op)
        return (False, "; ".join(reasons)) if reasons else self.available()

    # Segment reductions over each row's entries: scatter_reduce (max) and torch.segment_reduce (sum) over the
    # global CSR rows. The scatter backend overrides both with torch-scatter's segment_csr.

    def segment_max(self, blk: WindowBlock, vals):
        """``[h, B * Q]``: the maximum of ``vals [h, nnz]`` over each row's entries (``-inf`` for none)."""
        out = torch.full((vals.shape[0], blk.ent.rows), float("-inf"), dtype=vals.dtype, device=vals.device)
        return out.scatter_reduce_(1, blk.ent.row.expand_as(vals), vals, reduce="amax", include_self=True)

    def segment_sum(self, blk: WindowBlock, vals):
        """``[h, B * Q]``: the sum of ``vals [h, nnz]`` over each row's entries (0 for none)."""
        if vals.numel() == 0:      # no entries (some torch releases refuse segment_reduce on empty data)
            return vals.new_zeros((vals.shape[0], blk.ent.rows))
        return torch.segment_reduce(vals, "sum", offsets=blk.ent.indptr.expand(vals.shape[0], -1), axis=1)

    # window attention: softmax over each query's entries only

    def window_forward_block(self, blk: WindowBlock, qkv, state, out):
        """Local-mask attention of one block: ``p = softmax`` over each row's entries of
        ``scale <q, k_j> + bias_j + mask_j``, written into ``state [h, nnz]``; ``sum_j p_j keep_j v_j`` into
        ``out [h, B * Q, D]``. A row without an unmasked entry gets ``p = 0`` (a zero output)."""
        q, k, v = qkv
        row = blk.ent.row
        s = self.sddmm(blk, q, k).mul_(blk.call.scale)
        if blk.bvals is not None:
            s += blk.bvals
        if blk.emask is not None:
            s += blk.emask
        m = self.segment_max(blk, s)
        m = torch.where(m == float("-inf"), torch.zeros_like(m), m)                     # empty / masked rows
        s -= m[:, row]
        e = s.exp_()
        den = self.segment_sum(blk, e)
        inv = torch.where(den == 0, torch.zeros_like(den), 1.0 / den)
        torch.mul(e, inv[:, row], out=state)
        out += self.spmm(blk, state if blk.keep is None else state * blk.keep, v)

    def window_backward_block(self, blk: WindowBlock, qkv, upstream, state, grads):
        """Backward of `window_forward_block`: ``upstream = (g [B, H, Q, D], go = <g, o> [h, B * Q])``, ``state``
        the probabilities ``[h, nnz]``, ``grads = (dq [h, B * Q, D], dk, dv [B, H, K, D])``.

        With ``ds_j = p_j (keep_j <g, v_j> - <g, o>)``: adds ``scale sum_j ds_j k_j`` into ``dq``,
        ``scale ds_j q`` and ``p_j keep_j g`` into ``dk``, ``dv``; returns ``ds [h, nnz]`` (the gradient of the bias
        values).
        """
        (q, k, v), (g, go), (dq, dk, dv), p = qkv, upstream, grads, state
        scale = blk.call.scale
        self.spmm_t(blk, p if blk.keep is None else p * blk.keep, g, dv)
        diff = self.sddmm(blk, g, v)                                                      # <g, v_j>
        if blk.keep is not None:
            diff.mul_(blk.keep)
        diff.sub_(go[:, blk.ent.row])
        ds = diff.mul_(p)
        dq += self.spmm(blk, ds, k) * scale
        self.spmm_t(blk, ds * scale, q, dk)
        return ds

    # the sparse correction of sparse_bias_attention

    def forward_block(self, blk: WindowBlock, qkv, lse, state, totals):
        """Window terms of the correction for one block.

        ``lse [h, B * Q]`` (as `sparse_bias.dense.kernel_lse` gives it); writes ``p_j = exp(s_j - L)`` into
        ``state [h, nnz]`` (backends whose correction saves ``"p"``; None for the others); ``totals = (den [h, B * Q],
        removed [h, B * Q], out [h, B * Q, D])``: adds ``S`` into ``den``, the removed mass ``R = sum_j max(0, -a_j)``
        into ``removed`` (`sparse_bias._core.exact_rows` flags rows by it) and ``C`` into ``out``.
        """
        q, k, v = qkv
        den, removed, out = totals
        row = blk.ent.row
        s = self.sddmm(blk, q, k).mul_(blk.call.scale)                                    # s_j
        if blk.emask is not None:
            s += blk.emask
        s -= lse[:, row]
        if state is None:
            state = torch.empty_like(s)
        torch.exp(s, out=state)                                                           # p_j
        del s
        a = state * torch.expm1(blk.bvals)                                                # a_j
        den.index_add_(1, row, a)                                                         # S
        removed.index_add_(1, row, a.clamp(max=0.0), alpha=-1)                            # R
        out += self.spmm(blk, a if blk.keep is None else a * blk.keep, v)                 # C

    def backward_block(self, blk: WindowBlock, qkv, upstream, state, grads):
        """Window terms of the backward for one block.

        ``upstream = (gp, go)``: ``gp = g / (1 + S)`` ``[B, H, Q, D]`` and ``go = <g', o>`` ``[h, B * Q]``; ``state =
        (p [h, nnz] or None, lse [h, B * Q])``; ``grads = (dq [h, B * Q, D], dk, dv [B, H, K, D])``, added into.
        Returns the bias gradient ``[h, nnz]``.
        """
        (q, k, v), (gp, go), (p, lse), (dq, dk, dv) = qkv, upstream, state, grads
        scale = blk.call.scale
        if p is None:                                      # recompute p_j = exp(s_j - L)
            s = self.sddmm(blk, q, k).mul_(scale)
            if blk.emask is not None:
                s += blk.emask
            p = s.sub_(lse[:, blk.ent.row]).exp_()
        a = p * torch.expm1(blk.bvals)
        self.spmm_t(blk, a if blk.keep is None else a * blk.keep, gp, dv)                  # dv_j += a_j g'
        diff = self.sddmm(blk, gp, v)                                                      # <g', v_j>
        if blk.keep is not None:
            diff.mul_(blk.keep)
        diff.sub_(go[:, blk.ent.row])                                                      # - <g', o>
        d = a.mul_(diff)                                                                   # d_j = a_j (...)
        dq += self.spmm(blk, d, k) * scale
        self.spmm_t(blk, d.mul_(scale), q, dk)
        return diff.mul_(p).mul_(torch.exp(blk.bvals))              # p_j e^b_j (...): e^b, never 1 + expm1(b)
