"""The exact-row path of the correction: the rows where the additive correction would cancel, evaluated densely.

The correction writes ``o = (o_d + C) / (1 + S)``: a negative bias subtracts the window's unbiased share from the
dense pass. Where the window holds much of a row's attention and the bias removes it, that is a difference of nearly
equal numbers: the dense pass's rounding (and that of ``p_j = exp(s_j - L)``) is amplified by up to
``(1 + R) / (1 + S)`` in the output and, per key, by ``e^{-b}`` in ``dk`` / ``dv`` -- where
``R = sum_W p_j max(0, -expm1(b_j))`` is the unbiased mass the bias removes. So a row is *flagged* when
``R > EXACT_ROW_RATIO min(1, 1 + S)`` in some head (the bias removes more than 1/64 of the row's mass; random
q / k at the CMT shape put about 1 % of it on a window, so they rarely get there), or ``1 + S`` is not finite and
positive (an overflowing bias). Flagged rows are recomputed by a dense evaluation of just those rows with the bias
in the scores -- the dense version's own arithmetic, so its precision -- and their gradients likewise; the
correction serves every other row.

There is no capacity: every flagged row is recomputed, on every path.

* CPU tensors (eager or inside a compiled graph: the op's implementation runs on real tensors): the flagged rows
  are counted from CPU memory -- nothing waits for a device -- and evaluated in chunks of rows whose dense bias
  ``[H|1, R, K]`` stays within `EXACT_ROW_BUDGET` elements: the dense kernel (PyTorch's CPU flash kernel) with the
  chunk's bias as its mask, forward and backward, in the compute dtype (float32 for half inputs), and the bias
  gradient at the window entries; with dropout, the rows' scores written out (this library's keep decisions).
* CUDA with Triton: `sparse_bias.backends.triton.exact`, a flash-style kernel per (row, head) over every row whose
  program returns at once when its row is not flagged: decided on the device, no host read, no capacity.
* CUDA without Triton: the CPU path's chunks after one read of the flagged-row count (a host synchronisation,
  the only one; docs/gpu.md).
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional

import torch

from .call import Call
from .entries import Entries
from ..backends import triton as triton_exact
from ..dense import dense_lse_backward, dense_lse_forward, kernel_lse
from ..dense.dropout import dropout_scale

#: A row takes the exact path when the mass its bias removes exceeds this fraction of ``min(1, 1 + S)``. A larger
#: ratio (1/16) leaves rows with a 5 % window share under a -5 bias at 5x the dense version's ``dk`` error; 1/64
#: keeps every case of tests/test_concentrated.py within 4x, and random attention (~1 %) below it.
EXACT_ROW_RATIO = 1.0 / 64

#: Device types whose flagged rows are counted on the host without a device synchronisation.
HOST_DEVICES = ("cpu",)

#: Elements of one chunk's dense bias ``[H|1, R, K]`` (with dropout: of its scores ``[H, R, K]``): 2**23, 32 MB in
#: float32.
EXACT_ROW_BUDGET = 1 << 23


def flagged_rows(den: torch.Tensor, removed: torch.Tensor, out: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, Q]`` bool: the rows that take the exact path, from the normaliser ``den = 1 + S``, the removed mass
    ``removed = R`` (both ``[H, B * Q]``) and the corrected output ``out [H, B * Q, D]``: a row whose output is not
    finite (NaN / inf inputs) is evaluated densely too, so it has the dense version's NaN / inf pattern -- the
    correction's ``o_d + C`` would turn an infinite value into ``inf - inf = NaN``."""
    ok = (removed <= EXACT_ROW_RATIO * den.clamp(max=1.0)) & torch.isfinite(den) & (den > 0)
    ok &= torch.isfinite(out).all(dim=-1)
    return (~ok.all(dim=0)).view(batch, -1)


def _host_rows(flags: torch.Tensor) -> List[torch.Tensor]:
    """Per batch element, the flagged rows (LongTensor ``[n_b]``, ascending). Reads the counts on the host: free for
    CPU tensors, one synchronisation on a device."""
    counts = flags.sum(1).tolist()
    order = torch.argsort((~flags).to(torch.uint8), dim=1, stable=True)          # flagged rows first, in order
    return [order[b, :n] for b, n in enumerate(counts)]


def _chunks(rows: torch.Tensor, heads: int, keys: int):
    """``rows`` in chunks whose ``[heads, R, keys]`` buffers stay within `EXACT_ROW_BUDGET` elements."""
    step = max(1, EXACT_ROW_BUDGET // max(heads * keys, 1))
    return [rows[i:i + step] for i in range(0, rows.numel(), step)]


def _row_entries(ent: Entries, b: int, rows: torch.Tensor):
    """The window entries of rows ``rows [R]`` of batch element ``b`` as a ``[R, W]`` grid, ``W`` the longest of
    those rows: ``(entry [R, W], valid [R, W])`` -- entry ``indptr[r] + j`` for ``j`` below the row's count, a
    clamped dummy (invalid) beyond."""
    r = b * ent.queries + rows
    start, count = ent.indptr[r], ent.indptr[r + 1] - ent.indptr[r]
    width = count.max().tolist() if count.numel() else 0        # host rows: CPU memory, or after the host read
    j = torch.arange(width, device=rows.device)
    valid = j < count.unsqueeze(1)
    return (start.unsqueeze(1) + j).clamp(max=max(ent.nnz - 1, 0)), valid


def _row_bias(values: torch.Tensor, ent: Entries, entry: torch.Tensor, valid: torch.Tensor, cdt) -> torch.Tensor:
    """``[H|1, R, K]``: the bias of the rows densely (0 outside their windows)."""
    vals = values.to(cdt)[entry]                                                            # [R, W(, H)]
    vals = (vals.unsqueeze(-1) if vals.dim() == 2 else vals).masked_fill(~valid.unsqueeze(-1), 0.0)
    keys = ent.key[entry].unsqueeze(0).expand(vals.shape[-1], -1, -1)                       # [H|1, R, W]
    bias = torch.zeros(keys.shape[:2] + (ent.keys,), dtype=cdt, device=vals.device)
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


def _rows_forward(qkv, values: torch.Tensor, ent: Entries, call: Call, b: int, rows: torch.Tensor) -> torch.Tensor:
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


def _rows_backward(grad_rows: torch.Tensor, qkv, values: torch.Tensor, ent: Entries, call: Call, b: int,
                   rows: torch.Tensor, grads) -> None:
    """Adds the gradients of `_rows_forward` for the upstream ``grad_rows [H, R, D]`` into ``grads = (dq [B, H, Q,
    D] and dvalues (or None) in the compute dtype, dk, dv [B, H, K, D])``.

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
        keys = ent.key[entry]                                                               # [R, W]
        dvals = ds.gather(2, keys.unsqueeze(0).expand(ds.shape[0], -1, -1))                 # [H, R, W]
        dvals = dvals.masked_fill_(~valid, 0.0).permute(1, 2, 0)                            # [R, W, H]
        dvalues.index_add_(0, entry.flatten(), dvals.reshape(-1, dvals.shape[-1]).sum(1) if dvalues.dim() == 1
                           else dvals.reshape(-1, dvals.shape[-1]))


def _mask_heads(values: torch.Tensor, call: Call) -> int:
    """Heads of the rows' additive mask: 1 when the bias is shared and the call's mask broadcasts over heads."""
    if values.dim() == 2:
        return values.shape[1]
    return call.mask.shape[1] if call.mask is not None else 1


def _rows_problem(q, values: torch.Tensor, ent: Entries, call: Call, b: int, rows: torch.Tensor):
    """Rows ``rows`` of batch element ``b`` as a dense attention problem of their own: ``(q_rows [1, H, R, D], the
    call with the rows' bias (and mask) as its additive mask [1, H|1, R, K], the entry grid)``, compute dtype."""
    cdt = call.cdt
    grid = _row_entries(ent, b, rows)
    mask = _row_bias(values, ent, *grid, cdt).unsqueeze(0)                                   # [1, H|1, R, K]
    if call.mask is not None:
        m = call.mask[b:b + 1] if call.mask.shape[0] > 1 else call.mask
        mask = mask + (m[:, :, rows] if m.shape[2] > 1 else m).to(cdt)
    # Less each row's largest (finite) bias: the softmax is unchanged, and a huge bias (an overflowing one flags
    # its row) cannot swamp the kernel's log-normaliser, whose rounding the backward's exp(s - L) would inherit.
    top = mask.amax(-1, keepdim=True)
    mask = mask - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return q[b:b + 1, :, rows].to(cdt), replace(call, mask=mask), grid


def _kernel_forward(qkv_b, values, ent, call, b, rows, out) -> None:
    """The rows through the dense kernel with their bias as its mask (`sparse_bias.dense`: PyTorch's CPU flash
    kernel): written into ``out [H, B * Q, D]``."""
    qr, call_r, _ = _rows_problem(qkv_b[0], values, ent, call, b, rows)
    o, _, _ = dense_lse_forward(qr, qkv_b[1], qkv_b[2], call_r)
    out[:, b * ent.queries + rows] = o[0]


def _kernel_backward(grad_out, qkv_b, values, ent, call, b, rows, grads) -> None:
    """The rows' gradients through the dense kernel's own backward (``dq``; ``dk`` / ``dv`` into the buffers of
    ``grads``) and, at their window entries, the bias gradient ``p (<g, v_j> - <g, o>)``."""
    dq, dvalues, dk_b, dv_b = grads
    q, kb, vb = qkv_b
    qr, call_r, (entry, valid) = _rows_problem(q, values, ent, call, b, rows)
    o, lse, state = dense_lse_forward(qr, kb, vb, call_r)
    gr = grad_out[b:b + 1, :, rows].to(call.cdt)
    dq_r, dk_r, dv_r = dense_lse_backward(state, gr, (qr, kb, vb), (o, lse), call_r)
    dq[b].index_add_(1, rows, dq_r[0].to(dq.dtype))
    dk_b += dk_r[0]
    dv_b += dv_r[0]
    if dvalues is None:
        return
    step = max(1, EXACT_ROW_BUDGET // max(q.shape[1] * entry.shape[1] * q.shape[-1], 1))
    lse = kernel_lse(lse[0])
    delta = (gr[0] * o[0]).sum(-1, keepdim=True)                                            # <g, o>
    for i in range(0, rows.numel(), step):       # [H, r, W, D] gathers within the budget
        sl = slice(i, i + step)
        keys = ent.key[entry[sl]]                                                           # [r, W]
        mask = call_r.mask[0][:, sl]                                                        # [H|1, r, K]
        s = (qr[0][:, sl].unsqueeze(2) * kb[0][:, keys]).sum(-1).mul_(call.scale)           # [H, r, W]
        s += mask.gather(2, keys.unsqueeze(0).expand(mask.shape[0], -1, -1))
        p = s.sub_(lse[:, sl].unsqueeze(-1)).exp_()
        dp = (gr[0][:, sl].unsqueeze(2) * vb[0][:, keys]).sum(-1)                           # <g, v_j>
        ds = p.mul_(dp.sub_(delta[:, sl])).masked_fill_(~valid[sl], 0.0)
        ds = ds.permute(1, 2, 0).reshape(-1, ds.shape[0])
        dvalues.index_add_(0, entry[sl].flatten(), ds.sum(1) if dvalues.dim() == 1 else ds)


def _triton_exact(q: torch.Tensor, backend) -> Optional[object]:
    """The Triton exact-row kernels when they serve this call (a non-host device with Triton, or the triton
    backend under the interpreter), else None."""
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if backend is not None and backend.name == "triton":
        return triton_exact
    if q.device.type not in HOST_DEVICES and triton_exact.runs_on(q.device):
        return triton_exact
    return None


def exact_forward(out: torch.Tensor, qkv, values: torch.Tensor, ent: Entries, call: Call, flags: torch.Tensor,
                  backend=None) -> None:
    """Overwrite the flagged rows (``flags [B, Q]``) of ``out [H, B * Q, D]`` (compute dtype) with their dense
    evaluation."""
    if ent.batch == 0 or ent.queries == 0:
        return
    kernels = _triton_exact(qkv[0], backend)
    if kernels is not None:
        kernels.exact_forward(qkv, values, ent, call, flags, out)
        return
    heads = qkv[0].shape[1]
    for b, rows in enumerate(_host_rows(flags)):
        if not rows.numel():
            continue
        if call.dropout_p > 0:            # this library's dropout decisions: the dense rows written out
            for chunk in _chunks(rows, heads, ent.keys):
                out[:, b * ent.queries + chunk] = _rows_forward(qkv, values, ent, call, b, chunk)
            continue
        qkv_b = (qkv[0], qkv[1][b:b + 1].to(call.cdt), qkv[2][b:b + 1].to(call.cdt))
        for chunk in _chunks(rows, _mask_heads(values, call), ent.keys):
            _kernel_forward(qkv_b, values, ent, call, b, chunk, out)


def exact_backward(grad_out: torch.Tensor, qkv, values: torch.Tensor, ent: Entries, call: Call,
                   flags: torch.Tensor, grads, backend=None) -> None:
    """Add the flagged rows' gradients for the upstream ``grad_out [B, H, Q, D]`` into ``grads = (dq [B, H, Q, D]
    and dvalues (or None) in the compute dtype, dk, dv [B, H, K, D])``."""
    if ent.batch == 0 or ent.queries == 0:
        return
    kernels = _triton_exact(qkv[0], backend)
    if kernels is not None:
        kernels.exact_backward(grad_out, qkv, values, ent, call, flags, grads)
        return
    heads = qkv[0].shape[1]
    dq, dvalues, dk, dv = grads
    for b, rows in enumerate(_host_rows(flags)):
        if not rows.numel():
            continue
        if call.dropout_p > 0:            # this library's dropout decisions: the dense rows written out
            for chunk in _chunks(rows, heads, ent.keys):
                _rows_backward(grad_out[b][:, chunk].to(call.cdt), qkv, values, ent, call, b, chunk, grads)
            continue
        qkv_b = (qkv[0], qkv[1][b:b + 1].to(call.cdt), qkv[2][b:b + 1].to(call.cdt))
        direct = dk.dtype == call.cdt     # half inputs: the rows' dk / dv summed in the compute dtype, cast once
        dk_b, dv_b = (dk[b], dv[b]) if direct else (torch.zeros_like(dk[b], dtype=call.cdt),
                                                    torch.zeros_like(dv[b], dtype=call.cdt))
        for chunk in _chunks(rows, _mask_heads(values, call), ent.keys):
            _kernel_backward(grad_out, qkv_b, values, ent, call, b, chunk, (dq, dvalues, dk_b, dv_b))
        if not direct:
            dk[b] += dk_b.to(dk.dtype)
            dv[b] += dv_b.to(dv.dtype)
