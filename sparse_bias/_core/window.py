"""The math of `sparse_bias.window_attention`: softmax over each query's window entries only.

Forward per block of a backend (`sparse_bias.backends.base.Backend.window_forward_block`): scores at the entries
(SDDMM), segment max / sum over each row's CSR segment, values by SpMM. Backward, with ``p`` the window probabilities
(times the dropout multipliers ``keep`` where dropped), ``ds_j = p_j (keep_j <g, v_j> - <g, o>)``:
``dq = scale sum_j ds_j k_j``, ``dk_j += scale ds_j q``, ``dv_j += p_j keep_j g`` and ``d bias_j = ds_j``.

`forward` and `backward` are the implementations of the registered ops ``sparse_bias::window_attention`` and
``sparse_bias::window_attention_backward`` (`sparse_bias._core.ops`), with the arguments of `.correction`'s.
Nothing here reads a device value.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as objects.
from typing import List, Optional

import torch
from torch import Tensor

from .blocks import batch_major, head_major, window_blocks
from .call import Call
from .entries import Entries
from .threads import calling_thread_if_small
from ..backends import BACKENDS


def forward(q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor], index: List[Tensor], mask: Optional[Tensor],
            scale: float, dropout_p: float, seed: Tensor, backend: str) -> List[Tensor]:
    """``[out [B, H, Q, D], state]``: ``state`` the window probabilities ``[H, nnz]`` (backends that save ``"p"``)
    or the window log-sum-exp ``[H, B * Q]``."""
    ent, call, impl = Entries.from_args(index, q, k), Call.from_args(q, mask, scale, dropout_p, seed), BACKENDS[backend]
    bsz, heads, nq = q.shape[:3]
    saves_p = impl.saves("window") == "p"
    state = torch.empty(heads, ent.nnz if saves_p else ent.rows, dtype=call.cdt, device=q.device)
    out = torch.zeros(heads, ent.rows, v.shape[-1], dtype=call.cdt, device=q.device)
    with calling_thread_if_small(q, k, ent.key, dense=False):
        for blk in window_blocks(ent, values, impl, (bsz, heads, nq, k.shape[2]), call):
            impl.window_forward_block(blk, (q, k, v), state[blk.hs], out[blk.hs])
    return [batch_major(out, bsz).to(q.dtype), state]


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor], index: List[Tensor],
             mask: Optional[Tensor], out: Tensor, state: Tensor, scale: float, dropout_p: float, seed: Tensor,
             backend: str, want_values: bool) -> List[Tensor]:
    """``[dq, dk, dv, dvalues]`` of `forward` (``dvalues`` empty when not ``want_values``)."""
    ent, call, impl = Entries.from_args(index, q, k), Call.from_args(q, mask, scale, dropout_p, seed), BACKENDS[backend]
    cdt = call.cdt
    bsz, heads, nq = q.shape[:3]
    g = grad_out.to(cdt).contiguous()
    go = head_major((g * out.to(cdt)).sum(-1))                                        # <g, o> [H, B * Q]
    dq = torch.zeros(heads, ent.rows, q.shape[-1], dtype=cdt, device=q.device)
    dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))  # the kernels' layout
    ds_all = torch.empty(heads, ent.nnz, dtype=cdt, device=q.device) if want_values else None
    with calling_thread_if_small(q, k, ent.key, dense=False):
        for blk in window_blocks(ent, None if values is None else values.detach(), impl, (bsz, heads, nq, k.shape[2]),
                                 call):
            ds = impl.window_backward_block(blk, (q, k, v), (g, go[blk.hs]), state[blk.hs], (dq[blk.hs], dk, dv))
            if ds_all is not None:
                ds_all[blk.hs] = ds
    dvalues = q.new_empty(0)
    if ds_all is not None:
        dvalues = (ds_all.sum(0) if values.dim() == 1 else ds_all.t()).to(values.dtype)
    return [batch_major(dq, bsz).to(q.dtype), dk, dv, dvalues]
