"""The exact-row path of the correction: a dense evaluation of the rows where it would cancel, with static shapes.

Rows whose normaliser ``1 + S`` falls below `EXACT_ROW_THRESHOLD` in some head (a negative bias removes more than
3/4 of the attention mass) are recomputed densely: there ``o_d + C`` and ``1 + S`` cancel and would amplify rounding
errors by about ``1 / (1 + S)``. Non-finite normalisers (overflowing biases) too.

Nothing here reads a device value on the host: the rows are chosen on the device among a *static* number of
candidate rows per batch element, `exact_row_capacity` (``topk`` of the flags: flagged rows first), always
recomputed, and written back only where flagged. The capacity (`exact_row_capacity`) is ``2**18 // K`` rows per
batch element, at least 4 -- every row of a small problem, 4 rows at the CMT shape (K = 56,400), where the
recomputation then costs about 0.5% of the attention -- and ``SPARSE_BIAS_EXACT_ROWS`` overrides it. With AQR
weights in [-1, 1] (tanh) and scale 1 the normaliser stays above e^-1, so no row is flagged in practice; more flagged
rows than the capacity in one batch element keep the correction's result for the surplus (amplified rounding),
which the debug switch (`sparse_bias.set_debug_checks`) turns into an error.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ._call import Call
from ._checks import debug_checks_enabled
from ._entries import Entries
from .dense.dropout import dropout_scale

#: Rows whose normaliser ``1 + S`` falls below this are recomputed densely (see the module docstring).
EXACT_ROW_THRESHOLD = 0.25

#: Scores per batch element and head the exact path may recompute densely: the capacity is this many scores' worth
#: of rows (``2**18 // K``; every row of a small problem), but at least `EXACT_ROW_MIN` rows.
EXACT_ROW_BUDGET = 1 << 18

#: The least number of rows per batch element the exact path recomputes.
EXACT_ROW_MIN = 4


def exact_row_capacity(num_queries: int, num_keys: int) -> int:
    """Rows per batch element the exact path recomputes (static: from the sizes alone). ``SPARSE_BIAS_EXACT_ROWS``
    overrides it (read at each call's trace / run)."""
    env = os.environ.get("SPARSE_BIAS_EXACT_ROWS")
    rows = int(env) if env else max(EXACT_ROW_MIN, EXACT_ROW_BUDGET // max(num_keys, 1))
    return min(num_queries, max(rows, 0))


def flagged_rows(den: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, Q]`` bool: the rows of the normaliser ``den [H, B * Q]`` that take the exact path."""
    flag = ~(den > EXACT_ROW_THRESHOLD).all(dim=0) | ~torch.isfinite(den).all(dim=0)
    return flag.view(batch, -1)


def select_rows(flagged: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sel [B, R], valid [B, R])``: ``R = capacity`` distinct rows per batch element, flagged ones first, and
    whether each is flagged (static shapes: no host sync)."""
    vals, sel = flagged.to(torch.float32).topk(capacity, dim=1)
    if debug_checks_enabled():
        over = int((flagged.sum(1) - capacity).clamp(min=0).max()) if flagged.numel() else 0
        if over:
            raise RuntimeError(f"sparse_bias: {over} rows of a batch element need the exact path beyond its "
                               f"capacity of {capacity} rows (raise SPARSE_BIAS_EXACT_ROWS)")
    return sel, vals > 0


def _slots(ent: Entries, sel: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """LongTensor ``[nnz]``: the slot ``0 <= r < R`` of each entry's row among ``sel`` (``R`` for entries of rows not
    selected, or selected but not flagged: a dummy slot)."""
    bsz, cap = sel.shape
    slot = torch.where(valid, torch.arange(cap, device=sel.device).expand(bsz, cap), cap)
    pos = torch.full((ent.rows,), cap, dtype=torch.long, device=sel.device)
    pos = pos.scatter(0, row_positions(sel, ent.queries), slot.flatten())
    return pos[ent.row]


def _row_bias(values: torch.Tensor, ent: Entries, slots: torch.Tensor, cap: int, cdt) -> torch.Tensor:
    """``[B, H|1, R, K]``: the bias of the selected rows densely (0 outside their windows). Entries of other rows go
    to the dummy slot, which is dropped (static shapes)."""
    vals = values.to(cdt)
    vals = vals.unsqueeze(1) if vals.dim() == 1 else vals                                     # [nnz, H|1]
    buf = torch.zeros(ent.batch, cap + 1, ent.keys, vals.shape[1], dtype=cdt, device=vals.device)
    buf = buf.index_put((ent.entry_batch(), slots, ent.key), vals, accumulate=True)
    return buf[:, :cap].permute(0, 3, 1, 2)                                                 # [B, H|1, R, K]


def _probabilities(qs, k, values, ent: Entries, call: Call, sel, valid):
    """``(p, keep)``: the biased softmax ``[B, H, R, K]`` of the selected rows (a fully masked head: zeros) and the
    dropout multipliers (or None)."""
    cdt, mask = call.cdt, call.mask
    bsz, heads = qs.shape[:2]
    nk = k.shape[2]
    bidx = torch.arange(bsz, device=qs.device).unsqueeze(1)
    s = torch.matmul(qs, k.to(cdt).transpose(-1, -2)) * call.scale                         # [B, H, R, K]
    if mask is not None:
        mb = bidx if mask.shape[0] > 1 else torch.zeros_like(bidx)
        ms = sel if mask.shape[2] > 1 else torch.zeros_like(sel)
        s = s + mask[mb, :, ms].permute(0, 2, 1, 3)
    s = s + _row_bias(values, ent, _slots(ent, sel, valid), sel.shape[1], cdt)
    empty = torch.isneginf(s).all(-1, keepdim=True)                    # a fully masked head: zeros (conventions)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    keep = None
    if call.dropout_p > 0:
        index = (bidx.view(-1, 1, 1, 1), torch.arange(heads, device=qs.device).view(1, -1, 1, 1),
                 sel.view(bsz, 1, -1, 1), torch.arange(nk, device=qs.device))
        keep = dropout_scale(call.seed, call.dropout_p, index, (bsz, heads, ent.queries, nk), cdt)
    return p, keep


def _gather_rows(q, sel, cdt):
    bidx = torch.arange(q.shape[0], device=q.device).unsqueeze(1)
    return q[bidx, :, sel].permute(0, 2, 1, 3).to(cdt)                                      # [B, H, R, D]


def rows_forward(qkv, values: torch.Tensor, ent: Entries, call: Call, sel: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """Dense biased attention of the rows ``sel [B, R]``: ``[B, H, R, D]`` in the compute dtype. A fully masked head
    of a row gives zeros (docs/conventions.md)."""
    q, k, v = qkv
    p, keep = _probabilities(_gather_rows(q, sel, call.cdt), k, values, ent, call, sel, valid)
    return torch.matmul(p if keep is None else p * keep, v.to(call.cdt))


def rows_backward(grad_rows: torch.Tensor, qkv, values: torch.Tensor, ent: Entries, call: Call, sel: torch.Tensor,
                  valid: torch.Tensor):
    """Gradients of `rows_forward` for the upstream ``grad_rows [B, H, R, D]``: ``(dq [B, H, Q, D], dk, dv
    [B, H, K, D], dvalues like values)`` in the compute dtype (written out: custom-op kernels run below autograd).

    With ``pd = p keep``: ``dv = pd^T g``, ``ds = p (keep (g v^T) - <g, o>)``, ``dq = scale ds k``,
    ``dk = scale ds^T q``, ``d bias = ds`` at the window entries of the flagged rows."""
    q, k, v = qkv
    cdt = call.cdt
    qs = _gather_rows(q, sel, cdt)
    p, keep = _probabilities(qs, k, values, ent, call, sel, valid)
    pd = p if keep is None else p * keep
    vc, kc = v.to(cdt), k.to(cdt)
    dv = torch.matmul(pd.transpose(-1, -2), grad_rows)                                      # [B, H, K, D]
    dp = torch.matmul(grad_rows, vc.transpose(-1, -2))                                      # [B, H, R, K]
    if keep is not None:
        dp = dp * keep
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))                    # sum_i p_i keep_i <g, v_i> = <g, o>
    dqs = torch.matmul(ds, kc) * call.scale                                                 # [B, H, R, D]
    dk = torch.matmul(ds.transpose(-1, -2), qs) * call.scale
    bsz, heads, nq = q.shape[:3]
    dq = torch.zeros(bsz, nq, heads, q.shape[-1], dtype=cdt, device=q.device)
    dq = dq.index_put((torch.arange(bsz, device=q.device).unsqueeze(1), sel), dqs.permute(0, 2, 1, 3),
                      accumulate=True).transpose(1, 2)
    slots = _slots(ent, sel, valid)                                                         # [nnz]
    cap = sel.shape[1]
    dsb = torch.nn.functional.pad(ds, (0, 0, 0, 1))                                         # the dummy slot: 0
    dvals = dsb[ent.entry_batch(), :, slots, ent.key]                                       # [nnz, H]
    dvalues = dvals.sum(1) if values.dim() == 1 else dvals
    return dq, dk, dv, dvalues


def row_positions(sel: torch.Tensor, num_queries: int) -> torch.Tensor:
    """LongTensor ``[B * R]``: the global rows ``b * Q + sel``."""
    return (torch.arange(sel.shape[0], device=sel.device).unsqueeze(1) * num_queries + sel).flatten()


def exact_rows_mask(sel: torch.Tensor, valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``[B, Q]`` bool: the rows that took the exact path."""
    out = torch.zeros(sel.shape[0] * num_queries, dtype=torch.bool, device=sel.device)
    return out.scatter(0, row_positions(sel, num_queries), valid.flatten()).view(sel.shape[0], num_queries)


def apply_exact_rows(out: torch.Tensor, qkv, values: torch.Tensor, ent: Entries, call: Call, den: torch.Tensor
                     ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Overwrite the flagged rows of ``out [H, B * Q, D]`` (compute dtype) with their dense evaluation; returns
    ``(sel, valid)`` for the backward, or None when the problem has no rows."""
    cap = exact_row_capacity(ent.queries, ent.keys)
    if cap == 0 or ent.batch == 0:
        return None
    sel, valid = select_rows(flagged_rows(den, ent.batch), cap)
    with torch.no_grad():
        rows = rows_forward(qkv, values, ent, call, sel, valid)                                # [B, H, R, D]
    flat = row_positions(sel, ent.queries)
    new = rows.transpose(0, 1).reshape(rows.shape[1], -1, rows.shape[-1])                    # [H, B * R, D]
    out[:, flat] = torch.where(valid.flatten()[None, :, None], new, out[:, flat])
    return sel, valid
