"""The window terms of the sparse correction on Triton: the launchers of
`sparse_bias.backends.triton.correction_kernels` for one `sparse_bias.backends.base.WindowBlock`.

One program per (row, head) of the block walks the row's window entries, reading ``k`` / ``v`` rows straight from
the ``[B, H, K, D]`` tensors through the CSR key indices. Inputs in float32, float16 or bfloat16; all arithmetic in
float32; the ``dk`` / ``dv`` corrections of half-precision inputs go through a float32 scratch of the block's heads
(`sparse_bias.backends.triton.launch.KVAccumulator`). Nothing here reads a device value on the host.
"""
from __future__ import annotations

import torch

from .launch import KVAccumulator, entry_rows, next_power_of_2

__all__ = ["correction_forward", "correction_backward"]


def _kernels():
    """`sparse_bias.backends.triton.correction_kernels` (importing it imports triton: done on the first launch)."""
    from . import correction_kernels
    return correction_kernels


def _sizes(blk, q, k, block: int) -> dict:
    """The kernels' size arguments for the block ``blk`` and q ``[B, H, Q, D]``, k ``[B, H, K, D]``."""
    dim = q.shape[-1]
    return dict(nq=blk.ent.queries, nk=k.shape[2], h0=blk.hs.start, heads=q.shape[1], D=dim,
                DP=next_power_of_2(dim), BLOCK=block)


def _entry_operands(blk, *names):
    """``[(tensor, head stride)]`` of the block's per-entry operands ``names`` (``[h or 1, nnz]``)."""
    return [entry_rows(getattr(blk, n), n, blk.heads, blk.ent.nnz) for n in names]


def correction_forward(blk, qkv, lse, state, totals, block: int) -> None:
    """`sparse_bias.backends.base.Backend.forward_block` on Triton: ``qkv`` ``[B, H, Q|K, D]``, ``lse``
    ``[h, B * Q]``; writes ``p`` into ``state`` ``[h, nnz]`` and adds ``S``, ``R`` and ``C`` into ``totals = (den,
    removed [h, B * Q], out [h, B * Q, D])`` (unit last strides). ``block``: window entries per loop step."""
    den, removed, out = totals
    if blk.ent.nnz == 0 or blk.ent.rows == 0:
        return
    kern = _kernels()
    sizes = _sizes(blk, *qkv[:2], block)
    (bv, bv_s), (em, em_s), (kp, kp_s) = _entry_operands(blk, "bvals", "emask", "keep")
    q, k, v = (t.contiguous() for t in qkv)
    lse = lse if lse.stride(-1) == 1 else lse.contiguous()
    if out.stride(-1) != 1 or den.stride(-1) != 1 or removed.stride() != den.stride():
        raise RuntimeError("the triton backend writes into outputs with a unit last stride")
    grid = (blk.ent.rows, blk.heads)
    kern.correction_forward_kernel[grid](q, k, v, lse, blk.ent.indptr, blk.ent.key, bv, em if em is not None else bv,
                                         kp if kp is not None else bv, state, den, removed, out, scale=blk.call.scale,
                                         lse_s=lse.stride(0), bv_s=bv_s, em_s=em_s, kp_s=kp_s, p_s=state.stride(0),
                                         den_s=den.stride(0), out_s=out.stride(0), out_r=out.stride(1),
                                         HAS_EM=em is not None, HAS_KP=kp is not None, **sizes)


def correction_backward(blk, qkv, upstream, state, grads, block: int) -> torch.Tensor:
    """`sparse_bias.backends.base.Backend.backward_block` on Triton: ``upstream = (gp [B, H, Q, D], go [h, B * Q])``,
    ``state = (p [h, nnz], lse)``, ``grads = (dq [h, B * Q, D], dk, dv [B, H, K, D] contiguous)`` added into;
    returns the bias gradient ``[h, nnz]`` in the compute dtype."""
    (gp, go), (p, _), (dq, dk, dv) = upstream, state, grads
    db = torch.zeros(blk.heads, blk.ent.nnz, dtype=blk.call.cdt, device=gp.device)
    if blk.ent.nnz == 0 or blk.ent.rows == 0:
        return db
    kern = _kernels()
    sizes = _sizes(blk, *qkv[:2], block)
    (bv, bv_s), (kp, kp_s) = _entry_operands(blk, "bvals", "keep")
    q, k, v, gp = (t.contiguous() for t in qkv + (gp,))
    go = go if go.stride(-1) == 1 else go.contiguous()
    if not (dk.is_contiguous() and dv.is_contiguous() and dq.stride(-1) == 1):
        raise RuntimeError("the triton backend needs contiguous gradient buffers")
    kv = KVAccumulator.of(dk, dv, blk.hs.start, blk.heads)
    grid = (blk.ent.rows, blk.heads)
    kern.correction_backward_kernel[grid](q, k, v, gp, go, blk.ent.indptr, blk.ent.key, p, bv,
                                          kp if kp is not None else bv, dq, kv.gk, kv.gv, db, dkv_heads=kv.heads,
                                          dkv_h0=kv.first, scale=blk.call.scale, go_s=go.stride(0),
                                          p_s=p.stride(0), bv_s=bv_s, kp_s=kp_s, dq_s=dq.stride(0),
                                          dq_r=dq.stride(1), db_s=db.stride(0), HAS_KP=kp is not None, **sizes)
    kv.flush()
    return db
