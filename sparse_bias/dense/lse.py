"""The dense global pass: attention without bias that also returns the log-sum-exp, and its backward.

`dense_lse_forward` returns ``(out, lse, kernel)``; `dense_lse_backward` takes an upstream gradient, *any* output
tensor and the log-sum-exp and returns ``(dq, dk, dv)`` -- the sparse correction calls it with the final (biased)
output and ``g / (1 + S)``, which makes it exact for every key outside the windows.

Implementations, in order of preference:

* ``"cpu_flash"``: ``aten._scaled_dot_product_flash_attention_for_cpu`` (+ ``_backward``) -- all float
  dtypes, additive float mask, no dropout.
* ``"cuda_flash"``: ``aten._scaled_dot_product_flash_attention`` (+ ``_backward``) for float16 / bfloat16
  without a mask; the head dim is zero-padded to a multiple of 8.
* ``"cuda_efficient"``: ``aten._scaled_dot_product_efficient_attention`` (+ ``_backward``) otherwise (float32,
  or with a mask); its LSE (padded to a multiple of 32 along queries in some releases) is sliced.
  The adapters of both CUDA ops are pure functions in `sparse_bias.dense.private_ops` (tested on CPU against
  an emulation); each CUDA kernel is compared once with the chunked kernel on a tiny problem before first use
  (`sparse_bias._core.verify`).
* ``"cpu_dropout"``: with attention dropout on the CPU, the compiled flash-style kernel of
  ``sparse_bias/csrc/dense_dropout.cpp`` (online softmax over key blocks, the counter-hash keep decision of
  `sparse_bias.dense.dropout` computed inside the block loop, never stored; deterministic backward).
* ``"triton_dropout"``: with attention dropout on CUDA, the Triton kernels of `sparse_bias.backends.triton.dense`
  (the same decisions, computed in registers), after the same first-use check.
* ``"chunked"``: pure PyTorch (`sparse_bias.dense.chunked`), the fallback when a private op or the compiled
  kernels are missing or refuse the input, and for empty problems.

Whatever the kernel, a fully masked row comes out as ``out = 0``, ``lse = -inf`` (`sparse_bias.dense.boundary`).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .._core.call import Call
from .._core.extension import extension
from .._core.verify import verified
from ..backends import triton as triton_dense
from . import private_ops
from .boundary import fully_masked_rows, kernel_lse, unit_stride
from .chunked import chunked_backward, chunked_forward
from .dropout import seed64

__all__ = ["dense_lse_forward", "dense_lse_backward", "dense_kernel_name", "KERNELS"]

_HALF_AND_FLOAT = (torch.float32, torch.float16, torch.bfloat16)
_CUDA_OPS = {"cuda_flash": "_scaled_dot_product_flash_attention",
             "cuda_efficient": "_scaled_dot_product_efficient_attention"}


#: The dense kernels by name. The forward returns the name of the one it ran (after any fallback) and the backward
#: takes it: the registered ops pass it as its index in this tuple (`sparse_bias._core.ops`). The CUDA ops' extra
#: outputs are rebuilt from the sizes and the log-sum-exp (`sparse_bias.dense.private_ops.flash_aux` /
#: ``efficient_aux``), so a backward runs from tensors a custom op can save.
KERNELS = ("chunked", "cpu_flash", "cpu_dropout", "cuda_flash", "cuda_efficient", "triton_dropout")


def _has_op(name: str) -> bool:
    """Whether ``aten.<name>`` exists with a ``scale`` argument (the call convention used here; torch 2.0's
    private attention ops have none, and torch before 2.2 has no CPU flash op: the chunked kernel runs then)."""
    packet = getattr(torch.ops.aten, name, None)
    if packet is None:
        return False
    try:
        return any(arg.name == "scale" for arg in packet.default._schema.arguments)
    except (AttributeError, RuntimeError):
        return False


def dense_kernel_name(q: torch.Tensor, call: Call, num_keys: int = 1) -> str:
    """Which implementation `dense_lse_forward` uses for ``q`` and ``call`` (see the module docstring). Empty
    problems (a zero batch, head, query, key or head-dim size) take the chunked kernel: the private ops divide by
    such sizes."""
    if q.numel() == 0 or num_keys == 0:
        return "chunked"
    if call.dropout_p > 0:
        if q.device.type == "cpu" and extension()[0] is not None:
            return "cpu_dropout"
        if q.device.type == "cuda" and q.dtype in _HALF_AND_FLOAT and triton_dense.TRITON_AVAILABLE and \
                _checked("triton_dropout", q):  # pragma: no cover - exercised on GPU machines only
            return "triton_dropout"
        return "chunked"
    if q.device.type == "cpu" and _has_op("_scaled_dot_product_flash_attention_for_cpu"):
        return "cpu_flash"
    if q.device.type == "cuda":
        candidates = []
        if q.dtype in (torch.float16, torch.bfloat16) and call.mask is None:
            candidates.append("cuda_flash")
        candidates.append("cuda_efficient")
        for name in candidates:
            if _has_op(_CUDA_OPS[name]) and _checked(name, q):
                return name
    return "chunked"


def _check(name: str, q: torch.Tensor) -> Tuple[bool, str]:
    """A GPU dense kernel against the chunked one on a tiny problem: output, log-sum-exp and gradients (with
    dropout for ``"triton_dropout"``)."""
    gen = torch.Generator(device=q.device).manual_seed(0)
    shape = (1, 2, 37, q.shape[-1])
    tq, tk, tv = (torch.randn(shape, generator=gen, device=q.device).to(q.dtype) for _ in range(3))
    g = torch.randn(shape, generator=gen, device=q.device).to(q.dtype)
    tol = 1e-3 if q.dtype == torch.float32 else 3e-2
    call = Call.of(tq, 0.3, None, *((0.2, 5) if name == "triton_dropout" else (0.0, 0)))
    out, lse, kernel = _run_gpu(name, tq, tk, tv, call)
    ref_out, ref_lse = chunked_forward(tq, tk, tv, call)
    grads = dense_lse_backward(kernel, g, (tq, tk, tv), (out, lse), call)
    ref = chunked_backward(g, tq, tk, tv, out, kernel_lse(lse.float()), call)
    ok = bool(torch.allclose(out.float(), ref_out.float(), atol=tol, rtol=tol)
              and torch.allclose(lse.float(), ref_lse.float(), atol=tol, rtol=tol)
              and all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol) for a, b in zip(grads, ref)))
    return ok, "matches the chunked kernel" if ok else "disagrees with the chunked kernel"


def _checked(name: str, q: torch.Tensor) -> bool:
    """Whether GPU dense kernel ``name`` passed its first-use check for q's (device, dtype, head dim)."""
    key = ("dense", name, str(q.device), q.dtype, q.shape[-1])
    return verified(key, lambda: _check(name, q),
                    lambda detail: f"sparse_bias: the dense kernel {name} disagrees with the reference for "
                                   f"{key[2:]} ({detail}); using the chunked PyTorch kernel instead")[0]


def _run_gpu(name, q, k, v, call: Call):
    """A GPU dense kernel's ``(out, lse, name)``."""
    if name == "triton_dropout":
        out, lse = triton_dense.dense_forward(q, k, v, call)
        return out, lse, name
    if name == "cuda_flash":  # pragma: no cover - exercised on GPU machines only
        out, lse, _ = private_ops.flash_forward(torch.ops.aten, q, k, v, call.scale)
    else:  # pragma: no cover - exercised on GPU machines only
        out, lse, _ = private_ops.efficient_forward(torch.ops.aten, q, k, v, call.mask, call.scale)
    return out, lse, name


def _mask_for(call: Call, dtype: torch.dtype):
    return None if call.mask is None else call.mask.to(dtype)


def dense_lse_forward(q, k, v, call: Call) -> Tuple[torch.Tensor, torch.Tensor, str]:
    """Unbiased attention with its log-sum-exp.

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]``, each with a unit last stride (`unit_stride`).
        call: the `sparse_bias._core.call.Call` (scale, additive mask, dropout and seed, key range).

    Returns:
        ``(out [B, H, Q, D] in q's dtype, lse [B, H, Q] float32 (float64 for float64 input), kernel)``: pass
        ``kernel`` (the name of the kernel that ran, one of `KERNELS`) to `dense_lse_backward`. A fully masked row (every key ``-inf``, or no keys) gets ``out = 0``
        and ``lse = -inf``, whatever the kernel (the CPU flash op reports ``lse = 0`` there). A row with a ``+inf``
        score gets ``lse = NaN`` (every kernel's output is NaN there; its probabilities are NaN, as in ``softmax``).
    """
    out, lse, kernel = _forward(q, k, v, call)
    lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("nan")), lse)
    empty = fully_masked_rows(call.mask)
    if empty is not None:
        lse = lse.masked_fill(empty, float("-inf"))
        out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    return out, lse, kernel


def _forward(q, k, v, call: Call):
    name = dense_kernel_name(q, call, num_keys=k.shape[2])
    if name == "cpu_dropout":
        offset, total = call.key_range or (0, k.shape[2])
        out, lse = extension()[0].dense_forward(q, k, v, call.mask, call.scale, call.dropout_p, seed64(call.seed),
                                                offset, total)
        return out, lse, name
    if name == "cpu_flash":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, 0.0, False, attn_mask=_mask_for(call, q.dtype), scale=call.scale)
            return out, lse, name
        except RuntimeError:  # pragma: no cover - an input the private op refuses
            pass
    elif name != "chunked":
        try:
            return _run_gpu(name, q, k, v, call)
        except RuntimeError:  # pragma: no cover - an input the kernel refuses
            pass
    out, lse = chunked_forward(q, k, v, call)
    return out, lse, "chunked"


def dense_lse_backward(kernel: str, grad_out, inputs, outputs, call: Call
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `dense_lse_forward` on the kernel it ran.

    Args:
        kernel: the name `dense_lse_forward` returned.
        grad_out: ``[B, H, Q, D]``, any strides.
        inputs: ``(q, k, v)`` as passed to the forward.
        outputs: ``(out, lse)``: ``out`` may be any output tensor (it enters only through
            ``D = rowsum(grad_out * out)``), ``lse`` the forward's (``-inf`` on fully masked rows).
        call: the forward's call record.

    Returns:
        ``(dq, dk, dv)`` in q's dtype; a fully masked row contributes nothing.
    """
    q, k, v = inputs
    out, lse = outputs
    name = kernel
    grad_out = unit_stride(grad_out)
    lse = kernel_lse(lse)
    if name == "cpu_dropout":
        offset, total = call.key_range or (0, k.shape[2])
        return extension()[0].dense_backward(grad_out, q, k, v, out, lse, call.mask, call.scale, call.dropout_p,
                                             seed64(call.seed), offset, total)
    if name == "cpu_flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(), q, k, v, out, lse, 0.0, False, attn_mask=_mask_for(call, q.dtype),
            scale=call.scale)
    if name == "triton_dropout":
        return triton_dense.dense_backward(grad_out, (q, k, v), (out, lse), call)
    if name == "cuda_flash":  # pragma: no cover - exercised on GPU machines only
        return private_ops.flash_backward(torch.ops.aten, private_ops.flash_aux(q, k), grad_out,
                                          (q, k, v, out, outputs[1]), call.scale)
    if name == "cuda_efficient":  # pragma: no cover - exercised on GPU machines only
        aux = private_ops.efficient_aux(outputs[1], hip=torch.version.hip is not None)
        return private_ops.efficient_backward(torch.ops.aten, aux, grad_out, (q, k, v, out), call.mask, call.scale)
    return chunked_backward(grad_out, q, k, v, out, lse, call)

