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

#: Device types whose eager calls count the flagged rows on the host (reading a CPU tensor waits for no device) and
#: recompute exactly those; on the others, and inside a compiled graph, the static capacity applies.
HOST_DEVICES = ("cpu",)

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


def check_capacity(flagged: torch.Tensor, capacity: int) -> None:
    """Under the debug switch: raise when a batch element has more flagged rows than ``capacity`` (a device read)."""
    if debug_checks_enabled() and flagged.numel():
        over = int((flagged.sum(1) - capacity).clamp(min=0).max())
        if over:
            raise RuntimeError(f"sparse_bias: {over} rows of a batch element need the exact path beyond its "
                               f"capacity of {capacity} rows (raise SPARSE_BIAS_EXACT_ROWS)")


def select_rows(flagged: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sel [B, R], valid [B, R])``: ``R = capacity`` distinct rows per batch element, flagged ones first, and
    whether each is flagged (static shapes: no host sync)."""
    vals, sel = flagged.to(torch.float32).topk(capacity, dim=1)
    return sel, vals > 0


def _row_entries(ent: Entries, b: int, rows: torch.Tensor):
    """The window entries of rows ``rows [R]`` of batch element ``b`` as a static ``[R, K]`` grid (a row has at most
    K entries): ``(entry [R, K], valid [R, K])`` -- entry ``indptr[r] + j`` for ``j`` below the row's count, a
    clamped dummy (invalid) beyond. No ``nnz``-long scan, no host sync."""
    r = b * ent.queries + rows
    start, count = ent.indptr[r], ent.indptr[r + 1] - ent.indptr[r]
    j = torch.arange(ent.keys, device=rows.device)
    valid = j < count.unsqueeze(1)
    return (start.unsqueeze(1) + j).clamp(max=max(ent.nnz - 1, 0)), valid


def _row_bias(values: torch.Tensor, ent: Entries, entry: torch.Tensor, valid: torch.Tensor, cdt) -> torch.Tensor:
    """``[H|1, R, K]``: the bias of the rows densely (0 outside their windows)."""
    vals = values.to(cdt)[entry]                                                            # [R, K(, H)]
    vals = (vals.unsqueeze(-1) if vals.dim() == 2 else vals).masked_fill(~valid.unsqueeze(-1), 0.0)
    keys = ent.key[entry].unsqueeze(0).expand(vals.shape[-1], -1, -1)                       # [H|1, R, K]
    bias = torch.zeros(keys.shape, dtype=cdt, device=vals.device)
    return bias.scatter_add_(2, keys, vals.permute(2, 0, 1))        # keys are unique per row; invalid ones add 0


def _probabilities(qs, kb, values, ent: Entries, call: Call, b: int, rows, grid):
    """``(p, keep)``: the biased softmax ``[H, R, K]`` of rows ``rows`` of batch element ``b`` (a fully masked head:
    zeros) and the dropout multipliers (or None)."""
    cdt, mask = call.cdt, call.mask
    heads, nk = qs.shape[0], kb.shape[1]
    s = torch.matmul(qs, kb.to(cdt).transpose(-1, -2)).mul_(call.scale)                    # [H, R, K]
    if mask is not None:
        m = mask[b if mask.shape[0] > 1 else 0]                                             # [H|1, Q|1, K|1]
        s += m[:, rows] if m.shape[1] > 1 else m
    s += _row_bias(values, ent, *grid, cdt)
    empty = torch.isneginf(s).all(-1, keepdim=True)                    # a fully masked head: zeros (conventions)
    p = torch.softmax(s.masked_fill_(empty, 0.0), dim=-1).masked_fill_(empty, 0.0)
    keep = None
    if call.dropout_p > 0:
        index = (b, torch.arange(heads, device=qs.device).view(-1, 1, 1), rows.view(1, -1, 1),
                 torch.arange(nk, device=qs.device))
        keep = dropout_scale(call.seed, call.dropout_p, index, (None, heads, ent.queries, nk), cdt)
    return p, keep


def rows_forward(qkv, values: torch.Tensor, ent: Entries, call: Call, b: int, rows: torch.Tensor) -> torch.Tensor:
    """Dense biased attention of rows ``rows [R]`` of batch element ``b``: ``[H, R, D]`` in the compute dtype. A
    fully masked head of a row gives zeros (docs/conventions.md)."""
    q, k, v = qkv
    cdt = call.cdt
    p, keep = _probabilities(q[b][:, rows].to(cdt), k[b], values, ent, call, b, rows, _row_entries(ent, b, rows))
    return torch.matmul(p if keep is None else p.mul_(keep), v[b].to(cdt))


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """``out += alpha * (a @ b)`` for ``[H, K, D]`` outputs: in place when the dtypes agree (one pass over ``out``,
    no ``[H, K, D]`` temporary), else through a temporary in ``out``'s dtype."""
    if out.dtype == a.dtype:
        out.baddbmm_(a, b, alpha=alpha)
    else:
        out += torch.matmul(a, b).mul_(alpha).to(out.dtype)


def rows_backward(grad_rows: torch.Tensor, qkv, values: torch.Tensor, ent: Entries, call: Call, b: int,
                  rows: torch.Tensor, grads) -> None:
    """Adds the gradients of `rows_forward` for the upstream ``grad_rows [H, R, D]`` into ``grads = (dq [B, H, Q, D]
    and dvalues (or None) in the compute dtype, dk, dv [B, H, K, D])`` (written out: custom-op kernels run below
    autograd).

    With ``pd = p keep``: ``dv = pd^T g``, ``ds = p (keep (g v^T) - <g, o>)``, ``dq = scale ds k``,
    ``dk = scale ds^T q``, ``d bias = ds`` at the rows' window entries."""
    q, k, v = qkv
    dq, dvalues, dk, dv = grads
    cdt = call.cdt
    grid = _row_entries(ent, b, rows)
    qs, kb, vb = q[b][:, rows].to(cdt), k[b].to(cdt), v[b].to(cdt)
    p, keep = _probabilities(qs, kb, values, ent, call, b, rows, grid)
    pd = p if keep is None else p * keep
    _add_product(dv[b], pd.transpose(-1, -2), grad_rows, 1.0)                               # dv += pd^T g
    del pd
    dp = torch.matmul(grad_rows, vb.transpose(-1, -2))                                      # [H, R, K]
    if keep is not None:
        dp.mul_(keep)
    ds = dp.sub_((p * dp).sum(-1, keepdim=True)).mul_(p)        # sum_i p_i keep_i <g, v_i> = <g, o>
    del p
    dq[b].index_add_(1, rows, torch.matmul(ds, kb).mul_(call.scale))
    _add_product(dk[b], ds.transpose(-1, -2), qs, call.scale)                                # dk += scale ds^T q
    if dvalues is not None:
        entry, valid = grid
        keys = ent.key[entry]                                                               # [R, K]
        dvals = ds.gather(2, keys.unsqueeze(0).expand(ds.shape[0], -1, -1))                 # [H, R, K]
        dvals = dvals.masked_fill_(~valid, 0.0).permute(1, 2, 0)                            # [R, K, H]
        dvalues.index_add_(0, entry.flatten(), dvals.reshape(-1, dvals.shape[-1]).sum(1) if dvalues.dim() == 1
                           else dvals.reshape(-1, dvals.shape[-1]))


def row_positions(sel: torch.Tensor, num_queries: int) -> torch.Tensor:
    """LongTensor ``[B * R]``: the global rows ``b * Q + sel``."""
    return (torch.arange(sel.shape[0], device=sel.device).unsqueeze(1) * num_queries + sel).flatten()


def exact_rows_mask(sel: torch.Tensor, valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """``[B, Q]`` bool: the rows that took the exact path."""
    out = torch.zeros(sel.shape[0] * num_queries, dtype=torch.bool, device=sel.device)
    return out.scatter(0, row_positions(sel, num_queries), valid.flatten()).view(sel.shape[0], num_queries)


def apply_exact_rows(out: torch.Tensor, qkv, values: torch.Tensor, ent: Entries, call: Call, den: torch.Tensor,
                     on_host: bool = False) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Overwrite the flagged rows of ``out [H, B * Q, D]`` (compute dtype) with their dense evaluation; returns
    ``(sel, valid)`` for the backward, or None when no row is recomputed.

    ``on_host`` (eager calls on CPU tensors, `HOST_DEVICES`): the number of flagged rows is read on the host -- a
    CPU tensor, so nothing waits for a device -- and exactly those rows are recomputed (none: no cost at all, and no
    capacity limit). Otherwise the static capacity of `exact_row_capacity`, decided on the device."""
    if ent.batch == 0:
        return None
    flagged = flagged_rows(den, ent.batch)
    if on_host:
        cap = max(flagged.sum(1).tolist())       # read from CPU memory: no device synchronisation
    else:
        cap = exact_row_capacity(ent.queries, ent.keys)
    check_capacity(flagged, cap)
    if cap == 0:
        return None
    sel, valid = select_rows(flagged, cap)
    for b in range(ent.batch):                          # one batch element at a time: buffers [H, R, K]
        rows = rows_forward(qkv, values, ent, call, b, sel[b])                               # [H, R, D]
        flat = b * ent.queries + sel[b]
        out[:, flat] = torch.where(valid[b][None, :, None], rows, out[:, flat])
    return sel, valid
