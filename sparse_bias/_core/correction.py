"""The math of `sparse_bias.sparse_bias_attention` with a `SparseBias`: dense pass plus sparse correction.

Per query and head, with scores ``s_j`` over all keys and a bias ``b_j`` on the window ``W``:

* dense pass (no bias): ``o_d = sum_j p_j v_j``, ``p_j = exp(s_j - L)``, ``L = logsumexp(s)``;
* sparse pass over ``W``: ``a_j = p_j expm1(b_j)``, ``S = sum_W a_j``, ``C = sum_W a_j v_j``;
* output ``o = (o_d + C) / (1 + S)`` -- exactly ``softmax(s + b) v``.

The backward calls the dense kernel's own backward with ``g``, the final output and the biased log-normaliser
``L + log(1 + S)`` (the same as ``g / (1 + S)`` with ``L``, without rounding ``g / (1 + S)`` to the input dtype), which
is exact outside the windows, then adds the window terms: with ``g' = g / (1 + S)``,
``ds_j = a_j (<g', v_j> - <g', o>)`` on the window entries (the bias gradient), into ``dq`` / ``dk`` through the
scores and ``dv_j += a_j g'``. The window terms run on a backend of `sparse_bias.backends`; rows where the correction
would cancel take `.exact_rows`.

`forward` and `backward` are the implementations of the registered ops ``sparse_bias::sparse_attention`` and
``sparse_bias::sparse_attention_backward`` (`sparse_bias._core.ops`): they take tensors, floats and names only --
the index as `Entries.as_args`, the call as `Call.as_args` (the registered ops make the outputs contiguous).
Nothing here reads a device value.
"""
# No `from __future__ import annotations`: torch.library.custom_op reads the annotations as objects.
from typing import List, Optional

import torch
from torch import Tensor

from .blocks import batch_major, head_major, window_blocks
from .call import Call
from .entries import Entries
from .exact_rows import exact_backward, exact_forward, flagged_rows
from .threads import calling_thread_if_small
from ..backends import BACKENDS
from ..dense import KERNELS, dense_lse_backward, dense_lse_forward, kernel_lse


def forward(q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor], index: List[Tensor], mask: Optional[Tensor],
            scale: float, dropout_p: float, seed: Tensor, backend: str) -> List[Tensor]:
    """``[out [B, H, Q, D], lse [B, H, Q], den [H, B * Q], p [H, nnz] or [0], exact [B, Q] bool, kernel []]``.

    q, k, v with a unit last stride; ``values`` ``[nnz]`` / ``[nnz, H]`` or None with ``index`` ``[]`` and
    ``backend`` ``""`` (no bias: the dense pass alone). ``den``, ``p``, ``exact`` (the rows evaluated densely,
    `.exact_rows`) and ``kernel`` (the dense kernel that ran, its index in `sparse_bias.dense.KERNELS`; a CPU int64
    scalar) are what the backward needs; ``den``, ``p`` and ``exact`` are empty without a bias.
    """
    ent, call = Entries.from_args(index, q, k), Call.from_args(q, mask, scale, dropout_p, seed)
    cdt = call.cdt
    bsz, heads, nq = q.shape[:3]
    with calling_thread_if_small(q, k, None if ent is None else ent.key):
        out, lse, name = dense_lse_forward(q, k, v, call)
        kernel = torch.tensor(KERNELS.index(name), dtype=torch.int64)
        exact = torch.zeros(bsz, nq if ent is not None else 0, dtype=torch.bool, device=q.device)
        if ent is None:
            none = q.new_empty(0, dtype=cdt)
            return [out, lse, none, none.clone(), exact, kernel]
        impl = BACKENDS[backend]
        saves_p = impl.saves("correction") == "p"
        p = q.new_empty((heads, ent.nnz) if saves_p else (0,), dtype=cdt)
        den = torch.ones(heads, ent.rows, dtype=cdt, device=q.device)
        if ent.nnz == 0:
            return [out, lse, den, p, exact, kernel]
        removed = torch.zeros(heads, ent.rows, dtype=cdt, device=q.device)
        acc = head_major(out.to(cdt))                                                    # [H, B * Q, D]
        klse = head_major(kernel_lse(lse.to(cdt)))           # fully masked rows: p_j = 0 at their window keys
        for blk in window_blocks(ent, values, impl, (bsz, heads, nq, k.shape[2]), call):
            impl.forward_block(blk, (q, k, v), klse[blk.hs], p[blk.hs] if saves_p else None,
                               (den[blk.hs], removed[blk.hs], acc[blk.hs]))
        acc /= den.unsqueeze(-1)
        exact = flagged_rows(den, removed, acc, bsz)
        exact_forward(acc, (q, k, v), values, ent, call, exact, impl)
    return [batch_major(acc, bsz).to(q.dtype), lse, den, p, exact, kernel]


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor], index: List[Tensor],
             mask: Optional[Tensor], out: Tensor, lse: Tensor, den: Tensor, p: Tensor, exact: Tensor, kernel: Tensor,
             scale: float, dropout_p: float, seed: Tensor, backend: str, want_values: bool) -> List[Tensor]:
    """``[dq, dk, dv, dvalues]`` of `forward` (``dvalues`` empty when not ``want_values``), from its
    inputs and outputs; the dense backward runs on the kernel the forward ran."""
    ent, call = Entries.from_args(index, q, k), Call.from_args(q, mask, scale, dropout_p, seed)
    name = KERNELS[int(kernel.tolist())]                                  # a CPU scalar: no device synchronisation
    with calling_thread_if_small(q, k, None if ent is None else ent.key):
        if ent is None or ent.nnz == 0:
            dq, dk, dv = dense_lse_backward(name, grad_out, (q, k, v), (out, lse), call)
            dvalues = torch.zeros_like(values) if values is not None and want_values else None
        else:
            dq, dk, dv, dvalues = _backward(name, grad_out, (q, k, v, values, out, lse, den, p, exact), ent, call,
                                            BACKENDS[backend], want_values)
    return [dq, dk, dv, q.new_empty(0) if dvalues is None else dvalues]


def _backward(kernel: str, grad_out, saved, ent: Entries, call: Call, backend, want_values: bool):
    """``(dq, dk, dv, dvalues or None)`` with window entries; ``saved = (q, k, v, values, out, lse, den, p,
    exact)``."""
    q, k, v, values, out, lse, den, p, exact = saved
    cdt = call.cdt
    bsz, heads, nq = q.shape[:3]
    rows_exact = exact.view(bsz, 1, nq)
    g = grad_out.masked_fill(rows_exact.unsqueeze(-1), 0.0)      # the exact rows' gradients come from below
    den_b = batch_major(den, bsz)                                                       # [B, H, Q]
    gp = (g.to(cdt) / den_b.unsqueeze(-1)).masked_fill(rows_exact.unsqueeze(-1), 0.0)  # g' = g / (1 + S); their
    # 1 + S may be NaN / inf (what flagged them)
    # The dense backward takes g itself (in its dtype: no rounding of g') with the biased log-normaliser
    # L + log(1 + S): its p_j / (1 + S) is then the biased probability outside the window, the same gradients.
    lse_b = torch.where(rows_exact, lse.to(cdt), lse.to(cdt) + torch.log(den_b))
    out = out.masked_fill(rows_exact.unsqueeze(-1), 0.0)        # g = 0 there: <g, o> = 0 even where o is not finite
    dq, dk, dv = dense_lse_backward(kernel, g, (q, k, v), (out, lse_b), call)
    dq = head_major(dq.to(cdt))                                                        # [H, B * Q, D]
    if backend.needs_contiguous:             # kernels that address the gradient buffers directly
        dk, dv = dk.contiguous(), dv.contiguous()
    dvalues = torch.zeros_like(values, dtype=cdt) if want_values else None
    go = head_major((gp * out.to(cdt)).sum(-1))                                        # <g', o> [H, B * Q]
    klse = head_major(kernel_lse(lse.to(cdt)))
    # The exact rows' window terms must vanish: their g is 0, and a bias of 0 keeps a = p expm1(b) finite where
    # expm1(b) overflowed (an overflowing bias is what flagged some of them): no inf * 0 = NaN.
    in_exact = exact.view(-1)[ent.row]
    wvals = values.detach().masked_fill(in_exact.view((-1,) + (1,) * (values.dim() - 1)), 0.0)
    for blk in window_blocks(ent, wvals, backend, (bsz, heads, nq, k.shape[2]), call):
        db = backend.backward_block(blk, (q, k, v), (gp, go[blk.hs]), (p[blk.hs] if p.numel() else None,
                                                                       klse[blk.hs]), (dq[blk.hs], dk, dv))
        if dvalues is not None:
            if values.dim() == 1:
                dvalues += db.sum(0)
            else:
                dvalues[:, blk.hs] = db.t()
    dq = batch_major(dq, bsz)
    exact_backward(grad_out, (q, k, v), values.detach(), ent, call, exact, (dq, dvalues, dk, dv), backend)
    dvalues = None if dvalues is None else dvalues.to(values.dtype)
    return dq.to(q.dtype), dk, dv, dvalues
