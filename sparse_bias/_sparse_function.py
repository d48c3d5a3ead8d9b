"""The autograd Function of `sparse_bias.sparse_bias_attention`: dense pass plus sparse correction.

Per query and head, with scores ``s_j`` over all keys and a bias ``b_j`` on the window ``W``:

* dense pass (no bias): ``o_d = sum_j p_j v_j``, ``p_j = exp(s_j - L)``, ``L = logsumexp(s)``;
* sparse pass over ``W``: ``a_j = p_j expm1(b_j)``, ``S = sum_W a_j``, ``C = sum_W a_j v_j``;
* output ``o = (o_d + C) / (1 + S)`` -- exactly ``softmax(s + b) v``.

The backward calls the dense kernel's own backward with ``g / (1 + S)`` and the final output, which is
exact outside the windows, then adds the window terms (design brief, section 3). The window terms run on a
backend of `sparse_bias.backends`; rows where the correction would cancel take `._exact_rows`.
"""
from __future__ import annotations

import torch

from ._blocks import window_blocks
from ._call import Call
from ._exact_rows import exact_row_blocks, flagged_rows, rows_forward
from .dense import dense_lse_backward, dense_lse_forward, kernel_lse, unit_stride


class _SparseBiasAttention(torch.autograd.Function):
    """Forward and exact backward of the dense pass plus the sparse window correction.

    ``forward(q, k, v, values, win, call, backend)``: ``values`` ``[nnz]`` / ``[nnz, H]`` or None (no bias),
    ``win`` the `sparse_bias.WindowIndex` or None, ``call`` the `sparse_bias._call.Call`, ``backend`` a
    `sparse_bias.backends.Backend` (None without a bias).
    """

    @staticmethod
    def forward(ctx, q, k, v, values, win, call: Call, backend):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)       # the kernels' layout (docs/conventions.md)
        cdt = call.cdt
        shape = q.shape[:3] + (k.shape[2],)
        o_d, lse, kernel = dense_lse_forward(q, k, v, call)
        ctx.kernel, ctx.call, ctx.backend, ctx.win = kernel, call, backend, win
        ctx.shared = values is not None and values.dim() == 1
        if win is None or win.nnz == 0:
            ctx.sparse = False
            ctx.values_like = None if values is None else (values.shape, values.dtype)
            ctx.save_for_backward(q, k, v, o_d, lse)
            return o_d
        ctx.sparse = True
        p = torch.empty(shape[1], win.nnz, dtype=cdt, device=q.device) if backend.saves("correction") == "p" \
            else None
        den = torch.ones(shape[:3], dtype=cdt, device=q.device)
        out = o_d.to(cdt)
        klse = kernel_lse(lse.to(cdt))                     # fully masked rows: p_j = 0 at their window keys
        for blk in window_blocks(win, values, backend, shape, call):
            backend.forward_block(win, blk, (q, k, v), klse[blk.b, blk.hs],
                                  None if p is None else p[blk.hs, blk.e0:blk.e1], (den[blk.b, blk.hs],
                                                                                     out[blk.b, blk.hs]))
        out /= den.unsqueeze(-1)
        flagged = flagged_rows(den)                                                        # [B, Q]
        ctx.any_flagged = bool(flagged.any())
        if ctx.any_flagged:
            for b, rows in exact_row_blocks(flagged):
                out[b, :, rows] = rows_forward((q[b, :, rows], k[b], v[b]), values.detach(), win, call, b, rows)[0]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, values, p, den, flagged)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        call = ctx.call
        none = (None,) * 3
        if not ctx.sparse:
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = dense_lse_backward(ctx.kernel, grad_out, (q, k, v), (out, lse), call)
            dvalues = None
            if ctx.values_like is not None and ctx.needs_input_grad[3]:       # empty windows: a zero gradient
                dvalues = torch.zeros(ctx.values_like[0], dtype=ctx.values_like[1], device=q.device)
            return (dq, dk, dv, dvalues) + none
        q, k, v, out, lse, values, p, den, flagged = ctx.saved_tensors
        win, backend, cdt = ctx.win, ctx.backend, call.cdt
        shape = q.shape[:3] + (k.shape[2],)
        gp = grad_out.to(cdt) / den.unsqueeze(-1)                                          # g' = g / (1 + S)
        if ctx.any_flagged:
            gp = gp.masked_fill(flagged.view(shape[0], 1, shape[2], 1), 0.0)
        dq, dk, dv = dense_lse_backward(ctx.kernel, gp.to(q.dtype), (q, k, v), (out, lse), call)
        dq = dq.to(cdt)
        if backend.needs_contiguous:             # kernels that address the gradient buffers directly
            dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()

        dvalues = torch.zeros_like(values, dtype=cdt) if ctx.needs_input_grad[3] else None
        go = (gp * out.to(cdt)).sum(-1)                                                    # <g', o> [B, H, Q]
        klse = kernel_lse(lse.to(cdt))
        for blk in window_blocks(win, values.detach(), backend, shape, call):
            hs, e0, e1 = blk.hs, blk.e0, blk.e1
            db = backend.backward_block(win, blk, (q, k, v), (gp, go[blk.b, hs]),
                                        (None if p is None else p[hs, e0:e1], klse[blk.b, hs]), (dq[blk.b, hs], dk, dv))
            if dvalues is not None:
                if ctx.shared:
                    dvalues[e0:e1] += db.sum(0)
                else:
                    dvalues[e0:e1, hs] = db.t()

        if ctx.any_flagged:   # the dense rows, differentiated by autograd
            for b, rows in exact_row_blocks(flagged):
                with torch.enable_grad():
                    qr, kb, vb, vals = (t.detach().requires_grad_() for t in (q[b, :, rows], k[b], v[b], values))
                    o_rows, entries = rows_forward((qr, kb, vb), vals, win, call, b, rows)
                    gq, gk, gv, gval = torch.autograd.grad(o_rows, (qr, kb, vb, vals), grad_out[b, :, rows].to(cdt))
                dq[b, :, rows] += gq.to(cdt)
                dk[b] += gk.to(dk.dtype)
                dv[b] += gv.to(dv.dtype)
                if dvalues is not None:
                    dvalues[entries] = gval[entries].to(cdt)
        dq = dq.to(q.dtype)
        if dvalues is not None:
            dvalues = dvalues.to(values.dtype)
        return (dq, dk, dv, dvalues) + none
