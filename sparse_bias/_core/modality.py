"""The math of `sparse_bias.sparse_bias_attention` with a `sparse_bias.ModalityBias`: one bias per (query,
modality) over all keys of the modality.

Per modality ``m`` (a key range): ``(o_m, L_m)`` from the dense kernel on its keys; with ``z_m = L_m + c_m`` and
``w = softmax_m(z)``, ``o = sum_m w_m o_m``. Backward: the kernel's own backward on each range with
``grad_out = w_m g`` and ``out = o`` (exact: ``ds_j = p_j w_m (<g, v_j> - <g, o>)``), and
``dc_m = w_m (<g, o_m> - <g, o>)``. A modality whose keys are all masked for a row has ``L_m = -inf`` and weight 0;
a row masked everywhere gives zeros.

`forward` and `backward` are the implementations of the registered ops ``sparse_bias::modality_attention`` and
``sparse_bias::modality_attention_backward`` (`sparse_bias._core.ops`). Nothing here reads a device value.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as objects.
from typing import List, Optional

import torch
from torch import Tensor

from .call import Call
from .threads import calling_thread_if_small
from ..dense import KERNELS, dense_lse_backward, dense_lse_forward


def _ranges(bounds: List[int]):
    """``[(start, end), ...]`` from the flat ``[start_0, end_0, start_1, end_1, ...]`` the ops take."""
    return list(zip(bounds[0::2], bounds[1::2]))


def forward(q: Tensor, k: Tensor, v: Tensor, values: Tensor, bounds: List[int], mask: Optional[Tensor], scale: float,
            dropout_p: float, seed: Tensor) -> List[Tensor]:
    """``[out [B, H, Q, D], w [B, H, Q, M], outs [M, B, H, Q, D], lses [M, B, H, Q], kernels [M]]``.

    ``values`` ``[B, Q, M]`` (shared by heads) or ``[B, Q, M, H]``; ``bounds`` the modalities' key ranges, flat;
    ``kernels`` the dense kernel that ran on each range (indices in `sparse_bias.dense.KERNELS`, CPU int64).
    """
    call = Call.from_args(q, mask, scale, dropout_p, seed)
    cdt, nk = call.cdt, k.shape[2]
    outs, lses, kernels = [], [], []
    with calling_thread_if_small(q, k, None):
        for start, end in _ranges(bounds):
            o_m, lse_m, name = dense_lse_forward(q, k[:, :, start:end], v[:, :, start:end], call.keys(start, end, nk))
            outs.append(o_m)
            lses.append(lse_m.to(cdt))
            kernels.append(KERNELS.index(name))
    c = values.to(cdt)
    c = c.unsqueeze(1) if c.dim() == 3 else c.permute(0, 3, 1, 2)                       # [B, H|1, Q, M]
    w = torch.softmax(torch.stack(lses, dim=-1) + c, dim=-1)                            # [B, H, Q, M]
    w = torch.nan_to_num(w, nan=0.0)                                                    # fully masked rows
    out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=cdt, device=q.device)
    for i, o_m in enumerate(outs):
        out += w[..., i:i + 1] * o_m.to(cdt)          # a fully masked range: o_m = 0 (dense_lse_forward)
    return [out.to(q.dtype), w, torch.stack(outs), torch.stack(lses),
            torch.tensor(kernels, dtype=torch.int64)]


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, w: Tensor, outs: Tensor, lses: Tensor,
             kernels: Tensor, bounds: List[int], mask: Optional[Tensor], scale: float, dropout_p: float, seed: Tensor,
             shared: bool) -> List[Tensor]:
    """``[dq, dk, dv, dvalues]`` of `forward` (``dvalues`` ``[B, Q, M]`` when ``shared``, else ``[B, Q, M, H]``)."""
    call = Call.from_args(q, mask, scale, dropout_p, seed)
    cdt, nk = call.cdt, k.shape[2]
    g = grad_out.to(cdt)
    go = (g * out.to(cdt)).sum(-1)
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk, dv = torch.empty(k.shape, dtype=k.dtype, device=k.device), torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dc = []
    with calling_thread_if_small(q, k, None):
        for i, ((start, end), kernel) in enumerate(zip(_ranges(bounds), kernels.tolist())):   # a CPU tensor
            wi = w[..., i]
            dq_m, dk[:, :, start:end], dv[:, :, start:end] = dense_lse_backward(
                KERNELS[kernel], (wi.unsqueeze(-1) * g).to(q.dtype), (q, k[:, :, start:end], v[:, :, start:end]),
                (out, lses[i]), call.keys(start, end, nk))
            dq += dq_m.to(cdt)
            dc.append(wi * ((g * outs[i].to(cdt)).sum(-1) - go))                            # [B, H, Q]
    dc = torch.stack(dc, dim=-1)                                                        # [B, H, Q, M]
    dvalues = dc.sum(1) if shared else dc.permute(0, 2, 3, 1)
    return [dq.to(q.dtype), dk, dv, dvalues]
