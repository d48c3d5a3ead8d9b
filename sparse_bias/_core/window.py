"""The math of `sparse_bias.window_attention`: softmax over each query's window entries only.

Forward per block of a backend (`sparse_bias.backends.base.Backend.window_forward_block`): scores at the entries
(SDDMM), segment max / sum over each row's CSR segment, values by SpMM. Backward, with ``p`` the window probabilities
(times the dropout multipliers ``keep`` where dropped), ``ds_j = p_j (keep_j <g, v_j> - <g, o>)``:
``dq = scale sum_j ds_j k_j``, ``dk_j += scale ds_j q``, ``dv_j += p_j keep_j g`` and ``d bias_j = ds_j``. Plain
functions of tensors, wrapped by the registered op of `sparse_bias._core.ops`. Nothing here reads a device value.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .blocks import batch_major, head_major, window_blocks
from .call import Call
from .entries import Entries


def window_forward(q, k, v, values: Optional[torch.Tensor], ent: Entries, call: Call, backend
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Q, D], state)``: ``state`` the window probabilities ``[H, nnz]`` (backends that save ``"p"``) or
    the window log-sum-exp ``[H, B * Q]``."""
    cdt = call.cdt
    bsz, heads, nq = q.shape[:3]
    shape = (bsz, heads, nq, k.shape[2])
    saves_p = backend.saves("window") == "p"
    state = torch.empty(heads, ent.nnz if saves_p else ent.rows, dtype=cdt, device=q.device)
    out = torch.zeros(heads, ent.rows, v.shape[-1], dtype=cdt, device=q.device)
    for blk in window_blocks(ent, values, backend, shape, call):
        backend.window_forward_block(blk, (q, k, v), state[blk.hs], out[blk.hs])
    return batch_major(out, bsz).to(q.dtype), state


def window_backward(grad_out, saved, ent: Entries, call: Call, backend, want_values: bool):
    """``(dq, dk, dv, dvalues or None)`` of `window_forward`; ``saved = (q, k, v, values, out, state)``."""
    q, k, v, values, out, state = saved
    cdt = call.cdt
    bsz, heads, nq = q.shape[:3]
    shape = (bsz, heads, nq, k.shape[2])
    g = grad_out.to(cdt).contiguous()
    go = head_major((g * out.to(cdt)).sum(-1))                                        # <g, o> [H, B * Q]
    dq = torch.zeros(heads, ent.rows, q.shape[-1], dtype=cdt, device=q.device)
    dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))  # the kernels' layout
    ds_all = torch.empty(heads, ent.nnz, dtype=cdt, device=q.device) if want_values else None
    for blk in window_blocks(ent, None if values is None else values.detach(), backend, shape, call):
        ds = backend.window_backward_block(blk, (q, k, v), (g, go[blk.hs]), state[blk.hs], (dq[blk.hs], dk, dv))
        if ds_all is not None:
            ds_all[blk.hs] = ds
    dvalues = None
    if ds_all is not None:
        dvalues = (ds_all.sum(0) if values.dim() == 1 else ds_all.t()).to(values.dtype)
    return batch_major(dq, bsz).to(q.dtype), dk, dv, dvalues
