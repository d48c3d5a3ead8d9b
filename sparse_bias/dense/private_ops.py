"""Adapters for PyTorch's private CUDA attention ops: pure functions of an ``ops`` namespace.

The dense pass on CUDA calls ``aten._scaled_dot_product_flash_attention`` or
``aten._scaled_dot_product_efficient_attention`` (and their backwards) to get the log-sum-exp the correction
needs. Their conventions are not public API, so the code that adapts them sits here, as functions of
``ops`` (``torch.ops.aten`` in use; an emulation built from the chunked kernel in the tests, so a wrong
slice or argument order fails a CPU test):

* flash: the head dim must be a multiple of 8 -- q, k, v (and in the backward ``grad_out`` and ``out``) are
  zero-padded and outputs / gradients sliced back; the forward's ``cum_seq_q/k``, ``max_q/k`` and
  ``(rng_state, unused)`` (the philox seed and offset) go back to the backward unchanged;
* efficient: the log-sum-exp comes back padded along queries (to a multiple of 32 in current releases): the
  correction gets ``lse[..., :Q]``, the backward the raw padded tensor with the philox ``(seed, offset)``
  pair; an additive mask goes in as ``attn_bias`` with its rows 16-element aligned in memory.

Dropout is always 0 here: attention dropout uses the counter-hash mask of
`sparse_bias.dense.dropout`, which these kernels do not reproduce.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

#: the flash kernel's head-dim granularity, and the efficient kernel's attn_bias row alignment
FLASH_HEAD_DIM_MULTIPLE = 8
BIAS_ALIGNMENT = 16


def pad_head_dim(t: torch.Tensor, multiple: int = FLASH_HEAD_DIM_MULTIPLE) -> torch.Tensor:
    """``t [..., D]`` zero-padded on the last dim to a multiple of ``multiple``."""
    pad = (-t.shape[-1]) % multiple
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def aligned_bias(mask: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> Optional[torch.Tensor]:
    """The efficient kernel's ``attn_bias``: ``mask`` (broadcastable to ``[B, H, Q, K]``) in q's dtype, expanded
    to ``[B, H, Q, K]`` over storage whose rows are padded to a multiple of 16 elements."""
    if mask is None:
        return None
    nk = k.shape[2]
    pad = (-nk) % BIAS_ALIGNMENT
    base = torch.zeros(mask.shape[:-1] + (nk + pad,), dtype=q.dtype, device=q.device)
    base[..., :nk] = mask.to(q.dtype)
    return base[..., :nk].expand(q.shape[0], q.shape[1], q.shape[2], nk)


def flash_forward(ops, q, k, v, scale: float) -> Tuple[torch.Tensor, torch.Tensor, tuple]:
    """``(out [B, H, Q, D], lse [B, H, Q], aux)`` from the flash op; pass ``aux`` to `flash_backward`."""
    d = q.shape[-1]
    res = ops._scaled_dot_product_flash_attention(pad_head_dim(q), pad_head_dim(k), pad_head_dim(v), 0.0, False,
                                                   False, scale=scale)
    out, lse, cum_q, cum_k, max_q, max_k, philox_seed, philox_offset = res[:8]
    return out[..., :d], lse, (cum_q, cum_k, max_q, max_k, philox_seed, philox_offset)


def flash_backward(ops, aux: tuple, grad_out, tensors, scale: float):
    """``(dq, dk, dv)`` of `flash_forward`; ``tensors = (q, k, v, out, lse)``, ``out`` any output ``[B, H, Q, D]``."""
    q, k, v, out, lse = tensors
    cum_q, cum_k, max_q, max_k, philox_seed, philox_offset = aux
    d = q.shape[-1]
    grads = ops._scaled_dot_product_flash_attention_backward(
        pad_head_dim(grad_out.contiguous()), pad_head_dim(q), pad_head_dim(k), pad_head_dim(v),
        pad_head_dim(out.contiguous()), lse, cum_q, cum_k, max_q, max_k, 0.0, False, philox_seed, philox_offset,
        scale=scale)
    return tuple(g[..., :d] for g in grads[:3])


def efficient_forward(ops, q, k, v, mask: Optional[torch.Tensor], scale: float):
    """``(out, lse [B, H, Q], aux)`` from the efficient op (``mask`` additive, or None)."""
    nq = q.shape[2]
    out, lse, philox_seed, philox_offset = ops._scaled_dot_product_efficient_attention(
        q, k, v, aligned_bias(mask, q, k), True, 0.0, False, scale=scale)
    return out, lse[..., :nq], (lse, philox_seed, philox_offset)


def efficient_backward(ops, aux: tuple, grad_out, tensors, mask: Optional[torch.Tensor], scale: float):
    """``(dq, dk, dv)`` of `efficient_forward`; ``tensors = (q, k, v, out)`` (the raw padded log-sum-exp travels
    in ``aux``)."""
    q, k, v, out = tensors
    raw_lse, philox_seed, philox_offset = aux
    dq, dk, dv, _ = ops._scaled_dot_product_efficient_attention_backward(
        grad_out.contiguous(), q, k, v, aligned_bias(mask, q, k), out.contiguous(), raw_lse, philox_seed,
        philox_offset, 0.0, [True, True, True, False], False, scale=scale)
    return dq, dk, dv


def flash_aux(q: torch.Tensor, k: torch.Tensor) -> tuple:
    """The ``aux`` of `flash_backward` without dropout, rebuilt from the sizes: no cumulative sequence lengths,
    ``max_q = Q``, ``max_k = K`` and unused philox state (``uint64 [2]`` / ``uint64 []``, as the op's meta
    registration declares). Lets a backward run from ``(q, k, v, out, lse)`` alone (a custom op saves tensors it
    declares, not the kernel's private outputs)."""
    seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
    return None, None, q.shape[2], k.shape[2], seed, torch.zeros((), dtype=torch.uint64, device=q.device)


def efficient_aux(lse: torch.Tensor, hip: bool = False) -> tuple:
    """The ``aux`` of `efficient_backward` without dropout, rebuilt from the log-sum-exp ``[B, H, Q]``: the raw
    log-sum-exp padded to a multiple of 32 queries (not on ROCm), and unused ``long`` philox seed / offset."""
    nq = lse.shape[-1]
    pad = 0 if hip else -nq % 32
    raw = torch.nn.functional.pad(lse.float(), (0, pad)) if pad else lse.float()
    zero = torch.zeros((), dtype=torch.long, device=lse.device)
    return raw.contiguous(), zero, zero.clone()
