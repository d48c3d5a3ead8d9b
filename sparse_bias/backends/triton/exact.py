"""The exact rows of the correction on Triton: dense biased attention of the flagged rows, decided on the device.

`sparse_bias._core.exact_rows` flags the rows where the additive correction would cancel. On a GPU their number is a
device value; reading it would stall the host. The kernels of `sparse_bias.backends.triton.exact_kernels` run one
program per (row, head) over *every* row and return at once where the row is not flagged, so there is no host read
and no capacity: any number of flagged rows is exact.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import torch

from ..._core.call import Call
from .dense import call_args
from .launch import KVAccumulator, next_power_of_2

__all__ = ["exact_forward", "exact_backward", "BLOCK_N"]

#: key block size of the kernels
BLOCK_N = 32


def _kernels():
    """`sparse_bias.backends.triton.exact_kernels` (importing it imports triton: done on the first launch)."""
    from . import exact_kernels
    return exact_kernels


def _args(q: torch.Tensor, k: torch.Tensor, values: torch.Tensor, ent, call: Call):
    """``(mask, bias values, kwargs)``: the call's arguments (`sparse_bias.backends.triton.dense.call_args`), the bias
    values ``[nnz]`` / ``[nnz, H]`` as float32 ``[H|1, nnz]`` (head stride 0 when shared), the sizes."""
    mask, args = call_args(k, call)
    vals = values.to(torch.float32)
    bv, bv_s = (vals.unsqueeze(0), 0) if vals.dim() == 1 else (vals.t().contiguous(), ent.nnz)
    dim = q.shape[-1]
    return mask, bv, dict(args, nq=ent.queries, nk=k.shape[2], heads=q.shape[1], bv_s=bv_s, D=dim,
                          DP=max(16, next_power_of_2(dim)), BN=BLOCK_N)


def exact_forward(qkv, values: torch.Tensor, ent, call: Call, flags: torch.Tensor, out: torch.Tensor) -> None:
    """Overwrite the rows flagged in ``flags [B, Q]`` of ``out [H, B * Q, D]`` (float32, unit last stride) with
    their dense biased attention. ``qkv``: ``[B, H, Q|K, D]``; ``values`` ``[nnz]`` or ``[nnz, H]``; ``ent`` the
    index's `sparse_bias._core.entries.Entries`."""
    if ent.nnz == 0 or out.numel() == 0:
        return
    kern = _kernels()
    q, k, v = (t.contiguous() for t in qkv)
    if out.dtype != torch.float32 or out.stride(-1) != 1:
        raise RuntimeError("the exact-row kernels write float32 outputs with a unit last stride")
    mask, bv, args = _args(q, k, values, ent, call)
    grid = (ent.rows, q.shape[1])
    kern.exact_forward_kernel[grid](q, k, v, mask if mask is not None else bv, ent.indptr, ent.key, bv,
                                    flags.reshape(-1).to(torch.int8), out, out_s=out.stride(0), out_r=out.stride(1),
                                    **args)


def exact_backward(grad_out, qkv, values: torch.Tensor, ent, call: Call, flags: torch.Tensor, grads) -> None:
    """Add the flagged rows' gradients for ``grad_out [B, H, Q, D]`` into ``grads = (dq [B, H, Q, D] float32
    contiguous, dvalues [nnz] / [nnz, H] float32 or None, dk, dv [B, H, K, D])``."""
    dq, dvalues, dk, dv = grads
    if ent.nnz == 0 or dq.numel() == 0:
        return
    kern = _kernels()
    q, k, v, g = (t.contiguous() for t in tuple(qkv) + (grad_out,))
    if dq.dtype != torch.float32 or not dq.is_contiguous():
        raise RuntimeError("the exact-row kernels add into a contiguous float32 dq")
    mask, bv, args = _args(q, k, values, ent, call)
    heads = q.shape[1]
    kv = KVAccumulator.of(dk, dv, 0, heads)
    db = torch.zeros(heads, ent.nnz, dtype=torch.float32, device=q.device)
    grid = (ent.rows, heads)
    kern.exact_backward_kernel[grid](q, k, v, g, mask if mask is not None else bv, ent.indptr, ent.key, bv,
                                     flags.reshape(-1).to(torch.int8), dq, kv.gk, kv.gv, db, db_s=db.stride(0),
                                     **args)
    kv.flush()
    if dvalues is not None:
        dvalues += db.sum(0) if dvalues.dim() == 1 else db.t()
