"""The autograd Function of `sparse_bias.sparse_bias_attention` for a `sparse_bias.ModalityBias`."""
from __future__ import annotations

import torch

from .call import Call
from ..dense import dense_lse_backward, dense_lse_forward, unit_stride


class _ModalityBiasAttention(torch.autograd.Function):
    """Exact attention with one bias per (query, modality) over all keys of the modality.

    Per modality ``m`` (a key range): ``(o_m, L_m)`` from the dense kernel on its keys; with
    ``z_m = L_m + c_m`` and ``w = softmax_m(z)``, ``o = sum_m w_m o_m``. Backward: the kernel's own backward
    on each range with ``grad_out = w_m g`` and ``out = o`` (exact: ``ds_j = p_j w_m (<g, v_j> - <g, o>)``),
    and ``dc_m = w_m (<g, o_m> - <g, o>)``. A modality whose keys are all masked for a row has ``L_m = -inf``
    and weight 0; a row masked everywhere gives zeros.

    ``forward(q, k, v, values, ranges, call)``: ``values`` ``[B, Q, M]`` or ``[B, Q, M, H]``, ``ranges`` the
    modalities' ``(start, end)`` key ranges.
    """

    @staticmethod
    def forward(ctx, q, k, v, values, ranges, call: Call):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)       # the kernels' layout (docs/conventions.md)
        cdt = call.cdt
        nk = k.shape[2]
        outs, lses, kernels_used = [], [], []
        for start, end in ranges:
            o_m, lse_m, kern = dense_lse_forward(q, k[:, :, start:end], v[:, :, start:end], call.keys(start, end, nk))
            outs.append(o_m)
            lses.append(lse_m.to(cdt))
            kernels_used.append(kern)
        c = values.to(cdt)
        c = c.unsqueeze(1) if c.dim() == 3 else c.permute(0, 3, 1, 2)                       # [B, H|1, Q, M]
        w = torch.softmax(torch.stack(lses, dim=-1) + c, dim=-1)                            # [B, H, Q, M]
        w = torch.nan_to_num(w, nan=0.0)                                                    # fully masked rows
        out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=cdt, device=q.device)
        for i, o_m in enumerate(outs):
            out += w[..., i:i + 1] * o_m.to(cdt)          # a fully masked range: o_m = 0 (dense_lse_forward)
        out = out.to(q.dtype)
        ctx.ranges, ctx.call, ctx.kernels, ctx.shared = ranges, call, kernels_used, values.dim() == 3
        ctx.save_for_backward(q, k, v, out, w, *outs, *lses)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, w, *rest = ctx.saved_tensors
        n = len(ctx.ranges)
        outs, lses = rest[:n], rest[n:]
        call = ctx.call
        cdt = call.cdt
        nk = k.shape[2]
        g = grad_out.to(cdt)
        go = (g * out.to(cdt)).sum(-1)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dc = []
        for i, (start, end) in enumerate(ctx.ranges):
            wi = w[..., i]
            dq_m, dk[:, :, start:end], dv[:, :, start:end] = dense_lse_backward(
                ctx.kernels[i], (wi.unsqueeze(-1) * g).to(q.dtype), (q, k[:, :, start:end], v[:, :, start:end]),
                (out, lses[i]), call.keys(start, end, nk))
            dq += dq_m.to(cdt)
            dc.append(wi * ((g * outs[i].to(cdt)).sum(-1) - go))                            # [B, H, Q]
        dc = torch.stack(dc, dim=-1)                                                        # [B, H, Q, M]
        dvalues = dc.sum(1) if ctx.shared else dc.permute(0, 2, 3, 1)
        return dq.to(q.dtype), dk, dv, dvalues, None, None
