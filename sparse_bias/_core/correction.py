"""The math of `sparse_bias.sparse_bias_attention` with a `SparseBias`: dense pass plus sparse correction.

Per query and head, with scores ``s_j`` over all keys and a bias ``b_j`` on the window ``W``:

* dense pass (no bias): ``o_d = sum_j p_j v_j``, ``p_j = exp(s_j - L)``, ``L = logsumexp(s)``;
* sparse pass over ``W``: ``a_j = p_j expm1(b_j)``, ``S = sum_W a_j``, ``C = sum_W a_j v_j``;
* output ``o = (o_d + C) / (1 + S)`` -- exactly ``softmax(s + b) v``.

The backward calls the dense kernel's own backward with ``g``, the final output and the biased log-normaliser
``L + log(1 + S)`` (the same as ``g / (1 + S)`` with ``L``, without rounding ``g / (1 + S)`` to the input dtype), which
is exact outside the windows, then adds the window terms (design brief, section 3). The window terms run on a backend of
`sparse_bias.backends`; rows where the correction would cancel take `._exact_rows`. Plain functions of tensors: the
registered op of `sparse_bias._core.ops` wraps them (forward, fake, autograd). Nothing here reads a device value.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .blocks import batch_major, head_major, window_blocks
from .call import Call
from .entries import Entries
from .exact_rows import exact_backward, exact_forward, flagged_rows
from ..dense import dense_kernel_name, dense_lse_backward, dense_lse_forward, kernel_lse
from ..dense.lse import KernelState


def sparse_forward(q, k, v, values: Optional[torch.Tensor], ent: Optional[Entries], call: Call,
                   backend) -> Tuple[torch.Tensor, ...]:
    """``(out [B, H, Q, D], lse [B, H, Q], den [H, B * Q], p [H, nnz] or [0], exact [B, Q] bool)``.

    q, k, v with a unit last stride; ``values`` ``[nnz]`` / ``[nnz, H]`` or None (no bias, then ``ent`` and
    ``backend`` are None). ``den``, ``p`` and ``exact`` (the rows evaluated densely, `._exact_rows`) are what the
    backward needs; empty tensors when there is no bias.
    """
    cdt = call.cdt
    bsz, heads, nq = q.shape[:3]
    o_d, lse, _ = dense_lse_forward(q, k, v, call)
    exact = torch.zeros(bsz, nq if values is not None else 0, dtype=torch.bool, device=q.device)
    if values is None:
        return o_d, lse, q.new_empty(0, dtype=cdt), q.new_empty(0, dtype=cdt), exact
    shape = (bsz, heads, nq, k.shape[2])
    saves_p = backend.saves("correction") == "p"
    p = q.new_empty((heads, ent.nnz) if saves_p else (0,), dtype=cdt)
    den = torch.ones(heads, ent.rows, dtype=cdt, device=q.device)
    if ent.nnz == 0:
        return o_d, lse, den, p, exact
    removed = torch.zeros(heads, ent.rows, dtype=cdt, device=q.device)
    out = head_major(o_d.to(cdt))                                                    # [H, B * Q, D]
    klse = head_major(kernel_lse(lse.to(cdt)))           # fully masked rows: p_j = 0 at their window keys
    for blk in window_blocks(ent, values, backend, shape, call):
        backend.forward_block(blk, (q, k, v), klse[blk.hs], p[blk.hs] if saves_p else None,
                              (den[blk.hs], removed[blk.hs], out[blk.hs]))
    out /= den.unsqueeze(-1)
    exact = flagged_rows(den, removed, bsz)
    exact_forward(out, (q, k, v), values, ent, call, exact, backend)
    return batch_major(out, bsz).to(q.dtype), lse, den, p, exact


def sparse_backward(grad_out, saved, ent: Optional[Entries], call: Call, backend, want_values: bool):
    """``(dq, dk, dv, dvalues or None)`` of `sparse_forward`; ``saved = (q, k, v, values, out, lse, den, p,
    exact)``."""
    q, k, v, values, out, lse, den, p, exact = saved
    kernel = KernelState(dense_kernel_name(q, call, num_keys=k.shape[2]))
    if values is None or ent.nnz == 0:
        dq, dk, dv = dense_lse_backward(kernel, grad_out, (q, k, v), (out, lse), call)
        dvalues = torch.zeros_like(values) if values is not None and want_values else None
        return dq, dk, dv, dvalues
    cdt = call.cdt
    bsz, heads, nq = q.shape[:3]
    shape = (bsz, heads, nq, k.shape[2])
    rows_exact = exact.view(bsz, 1, nq)
    g = grad_out.masked_fill(rows_exact.unsqueeze(-1), 0.0)      # the exact rows' gradients come from below
    den_b = batch_major(den, bsz)                                                       # [B, H, Q]
    gp = (g.to(cdt) / den_b.unsqueeze(-1)).masked_fill(rows_exact.unsqueeze(-1), 0.0)  # g' = g / (1 + S); their
    # 1 + S may be NaN / inf (what flagged them)
    # The dense backward takes g itself (in its dtype: no rounding of g') with the biased log-normaliser
    # L + log(1 + S): its p_j / (1 + S) is then the biased probability outside the window, the same gradients.
    lse_b = torch.where(rows_exact, lse.to(cdt), lse.to(cdt) + torch.log(den_b))
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
    for blk in window_blocks(ent, wvals, backend, shape, call):
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
