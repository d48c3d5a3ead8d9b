"""The dense global pass: attention without bias that also returns the log-sum-exp, and its backward.

All use of PyTorch's private attention ops lives here. `dense_lse_forward` returns
``(out, lse)``; `dense_lse_backward` takes an upstream gradient, *any* output tensor and the
log-sum-exp and returns ``(dq, dk, dv)`` -- the sparse correction calls it with the final (biased)
output and ``g / (1 + S)``, which makes it exact for every key outside the windows.

Implementations, in order of preference:

* ``"cpu_flash"``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``) -- all float
  dtypes, additive float mask, no dropout.
* ``"cuda_flash"``: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``) for float16 / bfloat16
  without a mask; the head dim is zero-padded to a multiple of 8.
* ``"cuda_efficient"``: ``aten._scaled_dot_product_efficient_attention`` (+ ``_backward``) otherwise (float32,
  or with a mask); its LSE (padded to a multiple of 32 along queries in some releases) is sliced.
  The adapters of both CUDA ops are pure functions in `sparse_bias._private_ops` (tested on CPU against
  an emulation); each CUDA kernel is compared once with the chunked kernel on a tiny problem before first use.
* ``"cpu_dropout"``: with attention dropout on the CPU, the compiled flash-style kernel of
  ``sparse_bias/csrc/dense_dropout.cpp`` (online softmax over key blocks, the counter-hash keep decision of
  `dropout_keep` computed inside the block loop, never stored; deterministic backward).
* ``"triton_dropout"``: with attention dropout on CUDA, the Triton kernels of `sparse_bias.triton_dense`
  (the same decisions, computed in registers), after a one-off check against the chunked kernel.
* ``"chunked"``: pure PyTorch, in blocks of queries so that memory stays bounded; supports dropout (with the
  same counter-based mask), and is the fallback when a private op or the compiled kernels are missing or
  refuse the input.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import _private_ops

__all__ = ["dense_lse_forward", "dense_lse_backward", "dense_kernel_name", "dropout_keep", "seed_keys", "dropout_mask",
           "dropout_scale",
           "KernelState", "compute_dtype"]

#: Scores per block of the chunked fallback (``heads * queries * keys``).
CHUNK_SCORES = 1 << 22

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (or Python ints) holding values < 2^32 (products stay below 2^63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def seed_keys(seed: int) -> Tuple[int, int]:
    """The two 32-bit keys of a dropout seed: its low and high halves, each mixed by `_hash32`, so that
    seeds differing in a few bits give unrelated masks (raw seeds XORed into the index would give masks that
    are permutations of each other)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return int(_hash32((seed & _M32) ^ 0x9E3779B9)), int(_hash32((seed >> 32) ^ 0x7F4A7C15))


def dropout_keep(seed: int, flat_index: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of attention dropout as a pure function of ``(seed, flat_index)``.

    ``flat_index`` is the position of a score in the ``[B, H, Q, K]`` score tensor (row-major). The
    same entry always gets the same decision, so the dense pass, the window correction and the
    backward all see one consistent mask without storing it. Keep probability ``1 - p``:
    ``hash(hash(lo ^ k_lo) ^ hi ^ k_hi)``, with ``lo`` / ``hi`` the halves of the index and ``k_lo`` / ``k_hi``
    the keys of `seed_keys`; kept when its low 24 bits, as a uniform in [0, 1), are ``>= p``.
    """
    k_lo, k_hi = seed_keys(seed)
    x = flat_index.long()
    h = _hash32((x & _M32) ^ k_lo)
    h = _hash32(h ^ (x >> 32) ^ k_hi)
    uniform = (h & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))
    return uniform >= p


def dropout_scale(seed: int, p: float, b, h, q, key, heads: int, num_queries: int, num_keys: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Dropout multipliers ``keep / (1 - p)`` of the scores ``(b, h, q, key)`` of a ``[B, H, Q, K]`` score tensor.

    ``b``, ``h``, ``q``, ``key`` are ints or broadcastable LongTensors; the result has their broadcast shape.
    The one place that maps a score to its flat index for `dropout_keep`.
    """
    flat = ((b * heads + h) * num_queries + q) * num_keys + key
    return dropout_keep(seed, flat, p).to(dtype) / (1 - p)


def dropout_mask(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """The full keep-mask ``[B, H, Q, K]`` of `dropout_keep` (for references and tests)."""
    numel = math.prod(shape)
    return dropout_keep(seed, torch.arange(numel, device=device), p).view(*shape)


def seed64(seed: int) -> int:
    """The dropout seed as the compiled kernels take it: the signed int64 with the same low 64 bits (the kernels
    read them back as unsigned), so every seed -- negative or above 2^63 included -- gives the decisions of
    :func:`dropout_keep`."""
    bits = int(seed) & 0xFFFFFFFFFFFFFFFF
    return bits - (1 << 64) if bits >= (1 << 63) else bits


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@dataclass
class KernelState:
    """What `dense_lse_backward` needs besides the tensors: the kernel's name and its extra outputs."""

    name: str
    aux: tuple = ()


#: (kernel, device, dtype, head dim) -> whether a one-off comparison with the chunked kernel passed
_VERIFIED: Dict[tuple, bool] = {}


def _compiled():
    """The compiled CPU kernels (``sparse_bias._C``) when built and enabled, else None."""
    from .backends.fused import _extension
    return _extension()[0]


def dense_kernel_name(q: torch.Tensor, dropout_p: float = 0.0, masked: bool = False, num_keys: int = 1) -> str:
    """Which implementation `dense_lse_forward` uses for ``q`` (see the module docstring). Empty problems (a zero
    batch, head, query, key or head-dim size) take the chunked kernel: the private ops divide by such sizes."""
    if q.numel() == 0 or num_keys == 0:
        return "chunked"
    if dropout_p > 0:
        if q.device.type == "cpu" and _compiled() is not None:
            return "cpu_dropout"
        if q.device.type == "cuda" and q.dtype in _HALF_AND_FLOAT and _triton_available() and \
                _verified("triton_dropout", q):  # pragma: no cover - exercised on GPU machines only
            return "triton_dropout"
        return "chunked"
    if q.device.type == "cpu" and _has_op("_scaled_dot_product_flash_attention_for_cpu"):
        return "cpu_flash"
    if q.device.type == "cuda":
        candidates = []
        if q.dtype in (torch.float16, torch.bfloat16) and not masked:
            candidates.append("cuda_flash")
        candidates.append("cuda_efficient")
        for name in candidates:
            if _has_op(_CUDA_OPS[name]) and _verified(name, q):
                return name
    return "chunked"


_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


def _triton_available() -> bool:
    from .triton_dense import TRITON_AVAILABLE
    return TRITON_AVAILABLE


_CUDA_OPS = {"cuda_flash": "_scaled_dot_product_flash_attention",
             "cuda_efficient": "_scaled_dot_product_efficient_attention"}


def _verified(name: str, q: torch.Tensor) -> bool:
    """Run a GPU dense kernel once per (device, dtype, head dim) on a tiny problem and compare its output,
    log-sum-exp and gradients with the chunked kernel (with dropout for ``"triton_dropout"``), so that a PyTorch
    release that changes a private op's conventions, or a Triton miscompile, falls back to the slow-but-right
    path instead of giving wrong results."""
    key = (name, str(q.device), q.dtype, q.shape[-1])
    if key not in _VERIFIED:
        gen = torch.Generator(device=q.device).manual_seed(0)
        shape = (1, 2, 37, q.shape[-1])
        tq, tk, tv = (torch.randn(shape, generator=gen, device=q.device).to(q.dtype) for _ in range(3))
        g = torch.randn(shape, generator=gen, device=q.device).to(q.dtype)
        tol = 1e-3 if q.dtype == torch.float32 else 3e-2
        p, seed = (0.2, 5) if name == "triton_dropout" else (0.0, 0)
        try:
            out, lse, state = _run_forward(name, tq, tk, tv, None, 0.3, p, seed)
            ref_out, ref_lse = _chunked_forward(tq, tk, tv, None, 0.3, p, seed)
            grads = dense_lse_backward(state, g, tq, tk, tv, out, lse, None, 0.3, p, seed)
            ref = _chunked_backward(g, tq, tk, tv, out, lse.float(), None, 0.3, p, seed)
            ok = bool(torch.allclose(out.float(), ref_out.float(), atol=tol, rtol=tol)
                      and torch.allclose(lse.float(), ref_lse.float(), atol=tol, rtol=tol)
                      and all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(grads, ref)))
        except Exception:  # noqa: BLE001 - a kernel that fails to run fails its check
            ok = False
        if not ok:
            warnings.warn(f"sparse_bias: the dense kernel {name} disagrees with the reference for {key[1:]}; "
                          "using the chunked PyTorch kernel instead", RuntimeWarning)
        _VERIFIED[key] = ok
    return _VERIFIED[key]


def _mask_for(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return None if mask is None else mask.to(dtype)


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1, else a contiguous copy: the layout the private attention ops
    and the compiled kernels assume (``.contiguous()`` alone does not copy a size-1 last dim of stride 2)."""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def fully_masked_rows(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Bool ``[B, H|1, Q|1]``: the rows of an additive mask whose every key is ``-inf`` (or None without a mask)."""
    return None if mask is None else torch.isneginf(mask).all(-1)


def kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp as the probability kernels take it: ``+inf`` for a fully masked row (``-inf``), so that
    ``exp(s_j - L)`` is 0 at every key of that row instead of ``exp(-inf + inf) = NaN``."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _run_forward(name, q, k, v, mask, scale, dropout_p=0.0, seed=0, key_range=None):
    """A GPU dense kernel's ``(out, lse, state)``."""
    if name == "triton_dropout":
        from . import triton_dense
        out, lse = triton_dense.dense_forward(q, k, v, mask, scale, dropout_p, seed, key_range)
        return out, lse, KernelState(name)
    if name == "cuda_flash":  # pragma: no cover - exercised on GPU machines only
        out, lse, aux = _private_ops.flash_forward(torch.ops.aten, q, k, v, scale)
    else:  # pragma: no cover - exercised on GPU machines only
        out, lse, aux = _private_ops.efficient_forward(torch.ops.aten, q, k, v, mask, scale)
    return out, lse, KernelState(name, aux)


def dense_lse_forward(q, k, v, mask: Optional[torch.Tensor], scale: float, dropout_p: float = 0.0,
                      seed: int = 0, key_range: Optional[Tuple[int, int]] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor, KernelState]:
    """Unbiased attention with its log-sum-exp.

    Args:
        q: ``[B, H, Q, D]``.
        k: ``[B, H, K, D]``.
        v: ``[B, H, K, D]``.
        mask: additive float mask broadcastable to ``[B, H, Q, K]`` (``-inf`` = masked), or None.
        scale: softmax scale.
        dropout_p: attention dropout probability, with the mask of `dropout_keep`.
        seed: the dropout seed.
        key_range: ``(offset, total)`` when ``k`` holds keys ``offset : offset + K`` of a memory of ``total``
            keys: the dropout mask is then that of the whole memory.

    Returns:
        ``(out [B, H, Q, D] in q's dtype, lse [B, H, Q] float32 (float64 for float64 input), state)``; pass
        ``state`` to `dense_lse_backward`. A fully masked row (every key ``-inf``, or no keys) gets ``out = 0``
        and ``lse = -inf``, whatever the kernel (the CPU flash op reports ``lse = 0`` there); q, k and v must have
        a unit last stride (`unit_stride`).
    """
    out, lse, state = _dense_lse_forward(q, k, v, mask, scale, dropout_p, seed, key_range)
    empty = fully_masked_rows(mask)
    if empty is not None:
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse, state


def _dense_lse_forward(q, k, v, mask, scale, dropout_p, seed, key_range):
    name = dense_kernel_name(q, dropout_p, masked=mask is not None, num_keys=k.shape[2])
    if name == "cpu_dropout":
        offset, total = key_range or (0, k.shape[2])
        out, lse = _compiled().dense_forward(q, k, v, mask, scale, dropout_p, seed64(seed), offset, total)
        return out, lse, KernelState(name)
    if name == "cpu_flash":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=_mask_for(mask, q.dtype), scale=scale)
            return out, lse, KernelState(name)
        except RuntimeError:  # pragma: no cover - an input the private op refuses
            pass
    elif name != "chunked":
        try:
            return _run_forward(name, q, k, v, mask, scale, dropout_p, seed, key_range)
        except RuntimeError:  # pragma: no cover - an input the kernel refuses
            pass
    out, lse = _chunked_forward(q, k, v, mask, scale, dropout_p, seed, key_range)
    return out, lse, KernelState("chunked")


def dense_lse_backward(state: KernelState, grad_out, q, k, v, out, lse, mask, scale: float, dropout_p: float = 0.0,
                       seed: int = 0, key_range: Optional[Tuple[int, int]] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `dense_lse_forward` with its ``state``; ``out`` may be any output tensor (it enters
    only through ``D = rowsum(grad_out * out)``). Returns ``(dq, dk, dv)`` in q's dtype; a fully masked row
    (``lse = -inf``) contributes nothing."""
    name = state.name
    grad_out = unit_stride(grad_out)
    lse = kernel_lse(lse)
    if name == "cpu_dropout":
        offset, total = key_range or (0, k.shape[2])
        return _compiled().dense_backward(grad_out, q, k, v, out, lse, mask, scale, dropout_p, seed64(seed), offset,
                                          total)
    if name == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out, lse, 0.0, False, attn_mask=_mask_for(mask, q.dtype), scale=scale)
    if name == "triton_dropout":
        from . import triton_dense
        return triton_dense.dense_backward(grad_out, q, k, v, out, lse, mask, scale, dropout_p, seed, key_range)
    if name == "cuda_flash":  # pragma: no cover - exercised on GPU machines only
        return _private_ops.flash_backward(torch.ops.aten, state.aux, grad_out, q, k, v, out, lse, scale)
    if name == "cuda_efficient":  # pragma: no cover - exercised on GPU machines only
        return _private_ops.efficient_backward(torch.ops.aten, state.aux, grad_out, q, k, v, out, mask, scale)
    return _chunked_backward(grad_out, q, k, v, out, lse, mask, scale, dropout_p, seed, key_range)


def _blocks(q: torch.Tensor, k: torch.Tensor):
    """(b, h-slice, q-slice) blocks of at most CHUNK_SCORES scores."""
    bsz, heads, nq, _ = q.shape
    nk = max(k.shape[2], 1)
    rows = max(1, CHUNK_SCORES // nk)
    h_step = max(1, min(heads, rows // max(nq, 1))) if rows >= nq else 1
    q_step = nq if rows >= nq else rows
    for b in range(bsz):
        for h0 in range(0, heads, h_step):
            for q0 in range(0, nq, max(q_step, 1)):
                yield b, slice(h0, min(h0 + h_step, heads)), slice(q0, min(q0 + q_step, nq))


def _block_mask(mask, b, hs, qs):
    """The ``[h, q, K]`` block of a 4-D mask broadcastable to ``[B, H, Q, K]`` (size-1 dims kept)."""
    if mask is None:
        return None
    return mask[b if mask.shape[0] > 1 else 0, hs if mask.shape[1] > 1 else slice(0, 1),
                qs if mask.shape[2] > 1 else slice(0, 1)]


def _block_scale(seed, p, shape, b, hs, qs, device, dtype, key_range=None):
    """Dropout multipliers of the ``[h, q, K]`` block of batch element ``b``."""
    _, heads, nq, nk = shape
    offset, total = key_range or (0, nk)
    return dropout_scale(seed, p, b, torch.arange(hs.start, hs.stop, device=device).view(-1, 1, 1),
                         torch.arange(qs.start, qs.stop, device=device).view(1, -1, 1),
                         torch.arange(offset, offset + nk, device=device), heads, nq, total, dtype)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunked_forward(q, k, v, mask, scale, dropout_p, seed, key_range=None):
    cdt = compute_dtype(q.dtype)
    bsz, heads, nq, _ = q.shape
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=cdt, device=q.device)
    shape = (bsz, heads, nq, k.shape[2])
    for b, hs, qs in _blocks(q, k):
        s = torch.matmul(q[b, hs, qs].to(cdt), k[b, hs].to(cdt).transpose(-1, -2)) * scale
        m = _block_mask(mask, b, hs, qs)
        if m is not None:
            s = s + m.to(cdt)
        block_lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - kernel_lse(block_lse).unsqueeze(-1))                # fully masked rows: p = 0
        if dropout_p > 0:
            p = p * _block_scale(seed, dropout_p, shape, b, hs, qs, q.device, cdt, key_range)
        out[b, hs, qs] = torch.matmul(p, v[b, hs].to(cdt)).to(q.dtype)
        lse[b, hs, qs] = block_lse
    return out, lse


def _chunked_backward(grad_out, q, k, v, out, lse, mask, scale, dropout_p, seed, key_range=None):
    cdt = compute_dtype(q.dtype)
    bsz, heads, nq, _ = q.shape
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    delta = (grad_out.to(cdt) * out.to(cdt)).sum(-1)                       # D = rowsum(g * out)
    shape = (bsz, heads, nq, k.shape[2])
    for b, hs, qs in _blocks(q, k):
        qb, kb, vb, gb = (t.to(cdt) for t in (q[b, hs, qs], k[b, hs], v[b, hs], grad_out[b, hs, qs]))
        s = torch.matmul(qb, kb.transpose(-1, -2)) * scale
        m = _block_mask(mask, b, hs, qs)
        if m is not None:
            s = s + m.to(cdt)
        p = torch.exp(s - lse[b, hs, qs].to(cdt).unsqueeze(-1))
        dp = torch.matmul(gb, vb.transpose(-1, -2))
        pv = p
        if dropout_p > 0:
            keep = _block_scale(seed, dropout_p, shape, b, hs, qs, q.device, cdt, key_range)
            dp = dp * keep
            pv = p * keep
        ds = p * (dp - delta[b, hs, qs].unsqueeze(-1))
        dq[b, hs, qs] += torch.matmul(ds, kb) * scale
        dk[b, hs] += torch.matmul(ds.transpose(-1, -2), qb) * scale
        dv[b, hs] += torch.matmul(pv.transpose(-1, -2), gb)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
