"""The dense pass with the counter-hash attention dropout on Triton (the GPU dense pass when ``dropout_p > 0``).

PyTorch's CUDA attention kernels draw their dropout from philox streams whose layout is private; the exact
correction needs the *same* keep decision for a score in the dense pass, the window terms and the backward, which
the counter hash of `sparse_bias.dense.dropout.dropout_keep` gives as a pure function of the score's flat index. So
the dense pass with dropout runs the kernels of `sparse_bias.backends.triton.dense_kernels`: float32 accumulation for
float16 / bfloat16 / float32 inputs, the log-sum-exp of the undropped scores, a race-free two-pass backward.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

from ..._core.call import Call
from ...dense.dropout import seed_keys
from .launch import cdiv, next_power_of_2

__all__ = ["call_args", "dense_forward", "dense_backward", "BLOCK_M", "BLOCK_N"]

#: query / key block sizes of the kernels
BLOCK_M = 32
BLOCK_N = 32


def _kernels():
    """`sparse_bias.backends.triton.dense_kernels` (importing it imports triton: done on the first launch)."""
    from . import dense_kernels
    return dense_kernels


def _float32_dots(q: torch.Tensor) -> bool:
    """Whether the kernels convert tiles to float32 and multiply them in IEEE float32: for float32 inputs (no
    TF32), and for bfloat16 under the Triton interpreter, whose ``tl.dot`` gives wrong results on bfloat16
    tiles (numpy has no bfloat16), so there the kernels are tested with loads cast from bfloat16. On a GPU,
    float16 / bfloat16 tiles go to ``tl.dot`` as they are, with float32 accumulation."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def call_args(k: torch.Tensor, call: Call):
    """``(mask, kwargs)``: what every Triton attention kernel of the library takes from a call on ``k``
    ``[B, H, K, D]`` -- the additive mask ``[B|1, H|1, Q|1, K|1]`` in float32 (or None) with its strides (0 on
    broadcast dims), the key range, scale, dropout and seed keys."""
    mask = call.mask
    strides = [0, 0, 0, 0]
    if mask is not None:
        mask = mask.to(torch.float32)
        strides = [mask.stride(i) if mask.shape[i] > 1 else 0 for i in range(4)]
    offset, total = call.key_range or (0, k.shape[2])
    seed_lo, seed_hi = seed_keys(call.seed)
    return mask, dict(total=total, offset=offset, scale=float(call.scale), p=float(call.dropout_p), seed_lo=seed_lo,
                      seed_hi=seed_hi, m_sb=strides[0], m_sh=strides[1], m_sq=strides[2], m_sk=strides[3],
                      HAS_M=mask is not None, DROP=call.dropout_p > 0)


def _args(q: torch.Tensor, k: torch.Tensor, call: Call):
    """`call_args` plus the sizes and block sizes of ``q`` ``[B, H, Q, D]`` / ``k`` ``[B, H, K, D]``."""
    _, heads, nq, dim = q.shape
    mask, args = call_args(k, call)
    return mask, dict(args, nq=nq, nk=k.shape[2], heads=heads, D=dim, DP=max(16, next_power_of_2(dim)),
                      BM=BLOCK_M, BN=BLOCK_N, IEEE=_float32_dots(q))


def dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Q, D] in q's dtype, lse [B, H, Q] float32)`` of ``softmax(scale q k^T + mask) v`` with the
    counter-hash dropout of `sparse_bias.dense.dropout` (the call's scale, mask, dropout, seed and key range).
    q ``[B, H, Q, D]``, k, v ``[B, H, K, D]``: float32 / float16 / bfloat16, one device."""
    kern = _kernels()
    q, k, v = (t.contiguous() for t in (q, k, v))
    mask, args = _args(q, k, call)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    grid = (cdiv(q.shape[2], BLOCK_M), q.shape[0] * q.shape[1])
    kern.dense_forward_kernel[grid](q, k, v, mask if mask is not None else lse, out, lse, **args)
    return out, lse


def dense_backward(grad_out: torch.Tensor, inputs, outputs, call: Call
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of `dense_forward` for ``grad_out`` ``[B, H, Q, D]``; ``inputs = (q, k, v)``, ``outputs =
    (out, lse)`` -- ``out`` may be any output tensor (it enters only through ``rowsum(grad_out * out)``)."""
    kern = _kernels()
    q, k, v, g = (t.contiguous() for t in tuple(inputs) + (grad_out.to(inputs[0].dtype),))
    out, lse = outputs
    delta = (g.float() * out.float()).sum(-1).contiguous()
    lse = lse.float().contiguous()
    mask, args = _args(q, k, call)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    m = mask if mask is not None else lse
    bh = q.shape[0] * q.shape[1]
    kern.dense_backward_kv_kernel[(cdiv(k.shape[2], BLOCK_N), bh)](q, k, v, g, lse, delta, m, dk, dv, **args)
    kern.dense_backward_q_kernel[(cdiv(q.shape[2], BLOCK_M), bh)](q, k, v, g, lse, delta, m, dq, **args)
    return dq, dk, dv
