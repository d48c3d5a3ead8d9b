"""The autograd Function of `sparse_bias.window_attention`: softmax over each query's window entries only.

Forward per block of a backend (`sparse_bias.backends.base.Backend.window_forward_block`): scores at the entries
(SDDMM), segment max / sum over each query's CSR row, values by SpMM. Backward, with ``p`` the window probabilities
(times the dropout multipliers ``keep`` where dropped), ``ds_j = p_j (keep_j <g, v_j> - <g, o>)``:
``dq = scale sum_j ds_j k_j``, ``dk_j += scale ds_j q``, ``dv_j += p_j keep_j g`` and ``d bias_j = ds_j``.
"""
from __future__ import annotations

import torch

from ._blocks import window_blocks
from ._call import Call
from .dense import unit_stride


class _WindowAttention(torch.autograd.Function):
    """Forward and exact backward of attention restricted to the window entries.

    ``forward(q, k, v, values, win, call, backend)``: ``values`` ``[nnz]`` / ``[nnz, H]`` or None.
    """

    @staticmethod
    def forward(ctx, q, k, v, values, win, call: Call, backend):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)       # the kernels' layout (docs/conventions.md)
        cdt = call.cdt
        shape = q.shape[:3] + (k.shape[2],)
        saves_p = backend.saves("window") == "p"
        # the state for the backward: the window probabilities [H, nnz], or the window log-sum-exp [B, H, Q]
        state = (torch.empty(shape[1], win.nnz, dtype=cdt, device=q.device) if saves_p
                 else torch.empty(shape[:3], dtype=cdt, device=q.device))
        out = torch.zeros(shape[:3] + (v.shape[-1],), dtype=cdt, device=q.device)
        for blk in window_blocks(win, values, backend, shape, call):
            st = state[blk.hs, blk.e0:blk.e1] if saves_p else state[blk.b, blk.hs]
            backend.window_forward_block(win, blk, (q, k, v), st, out[blk.b, blk.hs])
        out = out.to(q.dtype)
        ctx.win, ctx.call, ctx.backend, ctx.saves_p = win, call, backend, saves_p
        ctx.values_meta = None if values is None else (values.dim() == 1, values.dtype)
        ctx.values = None if values is None or saves_p else values.detach()   # probabilities recomputed
        ctx.save_for_backward(q, k, v, out, state)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, state = ctx.saved_tensors
        win, backend, call = ctx.win, ctx.backend, ctx.call
        cdt = call.cdt
        shape = q.shape[:3] + (k.shape[2],)
        g = unit_stride(grad_out.to(cdt))
        go = (g * out.to(cdt)).sum(-1)                                                   # <g, o> [B, H, Q]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))  # the kernels' layout
        want_values = ctx.values_meta is not None and ctx.needs_input_grad[3]
        ds_all = torch.empty(shape[1], win.nnz, dtype=cdt, device=q.device) if want_values else None
        for blk in window_blocks(win, ctx.values, backend, shape, call):
            st = state[blk.hs, blk.e0:blk.e1] if ctx.saves_p else state[blk.b, blk.hs]
            ds = backend.window_backward_block(win, blk, (q, k, v), (g, go[blk.b, blk.hs]), st,
                                               (dq[blk.b, blk.hs], dk, dv))
            if ds_all is not None:
                ds_all[blk.hs, blk.e0:blk.e1] = ds
        dvalues = None
        if ds_all is not None:
            shared, vdtype = ctx.values_meta
            dvalues = (ds_all.sum(0) if shared else ds_all.t()).to(vdtype)
        return dq.to(q.dtype), dk, dv, dvalues, None, None, None
