"""Window attention on Triton: the launchers of `sparse_bias.backends.triton.window_kernels`.

Layout (global CSR over all batch elements): row ``r = b * Q + q`` owns the window entries ``e`` in
``[indptr[r], indptr[r + 1])``; entry ``e`` names the key ``key[e]`` in ``[0, K)``. A launch covers a block of ``h``
consecutive heads ``h0 .. h0 + h - 1`` of the ``H`` heads of ``q`` / ``k`` / ``v`` (``[B, H, Q|K, D]``). Per-entry
operands are ``[h or 1, nnz]`` (a first dimension of 1: shared by all heads) and per-row results ``[h, B * Q]`` /
``[h, B * Q, D]``. The kernels compute in float32 whatever the input dtype (float32, float16 or bfloat16).

The launchers check sizes and strides only and never synchronise with the device (the grid ``(B * Q, h)`` comes from
sizes). Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set before
triton is imported).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .launch import KVAccumulator, entry_rows, next_power_of_2, unit_last

__all__ = ["window_attention_forward", "window_attention_backward", "BLOCK"]

#: window entries per block of the kernels' loop
BLOCK = 32


def _kernels():
    """`sparse_bias.backends.triton.window_kernels` (importing it imports triton: done on the first launch)."""
    from . import window_kernels
    return window_kernels


def _sizes(q, k, v, indptr, h0: int, h: int) -> Tuple[int, int, int, int, int]:
    """``(B, H, Q, K, D)``. q, k, v come validated (`sparse_bias._core.inputs`); checked here is the launch's own
    contract, which a caller inside the library could break: contiguous q / k / v, the head block, the row pointer
    (sizes and strides only: no device synchronisation)."""
    nb, heads, nq, dim = q.shape
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("q, k, v must be contiguous")
    if indptr.numel() != nb * nq + 1:
        raise ValueError(f"indptr must have B * Q + 1 = {nb * nq + 1} entries, got {indptr.numel()}")
    if not (0 <= h0 and h0 + h <= heads):
        raise ValueError(f"head block [{h0}, {h0 + h}) is outside the {heads} heads")
    return nb, heads, nq, k.shape[2], dim


def _entry_operands(bvals, emask, keep, h: int, nnz: int, fallback: torch.Tensor):
    """The per-entry operands as the kernels take them: ``(bv, em, kp)`` (an absent one replaced by ``fallback``,
    never read), their head strides, and the ``HAS_BIAS`` / ``HAS_EMASK`` / ``HAS_KEEP`` flags."""
    ops = [entry_rows(t, name, h, nnz) for t, name in ((bvals, "bvals"), (emask, "emask"), (keep, "keep"))]
    tensors = [fallback if t is None else t for t, _ in ops]
    strides = [s for _, s in ops]
    flags = dict(HAS_BIAS=ops[0][0] is not None, HAS_EMASK=ops[1][0] is not None, HAS_KEEP=ops[2][0] is not None)
    return tensors, strides, flags


def window_attention_forward(q, k, v, indptr, key, bvals, emask, keep, scale: float, h0: int, out, lse) -> None:
    """Window attention forward for the head block ``h0 .. h0 + h - 1`` (``h = out.shape[0]``).

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]``. Contiguous, all float32, float16 or bfloat16.
        indptr: int64 ``[B * Q + 1]``, the CSR row pointer of the global rows ``r = b * Q + q``.
        key: int64 ``[nnz]``, the key index in ``[0, K)`` of each window entry.
        bvals, emask: ``None`` or float32 ``[h or 1, nnz]`` added to the scores (a first dim of 1: shared by
            all heads). ``emask`` typically holds 0 / -inf.
        keep: ``None`` or float32 ``[h, nnz]`` dropout multipliers applied to ``p`` in the output.
        scale: the score scale. h0: the block's first head.
        out: float32 ``[h, B * Q, D]``, any strides with ``stride(-1) == 1``; overwritten with the output.
        lse: float32 ``[h, B * Q]`` with ``stride(-1) == 1``; overwritten with the window log-sum-exp
            (-inf for empty or fully masked rows, whose output is 0).
    """
    h = out.shape[0]
    nb, heads, nq, nk, dim = _sizes(q, k, v, indptr, h0, h)
    if tuple(out.shape) != (h, nb * nq, dim) or tuple(lse.shape) != (h, nb * nq):
        raise ValueError(f"out must be [h, B*Q, D] = {(h, nb * nq, dim)} and lse [h, B*Q], got "
                         f"{tuple(out.shape)}, {tuple(lse.shape)}")
    unit_last(out, "out")
    unit_last(lse, "lse")
    if h == 0 or nb * nq == 0:
        return
    nnz = key.numel()
    if nnz == 0:                                 # no window anywhere: nothing to launch
        lse.fill_(float("-inf"))
        out.zero_()
        return
    kern = _kernels()
    (bv, em, kp), (bv_s, em_s, kp_s), flags = _entry_operands(bvals, emask, keep, h, nnz, lse)
    kern.window_forward_kernel[(nb * nq, h)](q, k, v, indptr, key, bv, em, kp, out, lse,
                                             nq, nk, heads, h0, dim, float(scale),
                                             bv_s, em_s, kp_s, out.stride(0), out.stride(1), lse.stride(0),
                                             DP=next_power_of_2(dim), BLOCK=BLOCK, **flags)


def window_attention_backward(q, k, v, indptr, key, bvals, emask, keep, scale: float, h0: int, g, go, lse, dq, dk,
                              dv, db) -> None:
    """Window attention backward for the head block ``h0 .. h0 + h - 1`` (``h = lse.shape[0]``).

    Args:
        q, k, v, indptr, key, bvals, emask, keep, scale, h0: as in `window_attention_forward`.
        g: float32 ``[B, H, Q, D]``, contiguous: the output gradient (heads ``h0 .. h0 + h - 1`` are read).
        go: float32 ``[h, B * Q]`` (unit last stride): ``<g[b, h0 + i, q], out[i, r]>``.
        lse: float32 ``[h, B * Q]``: the forward's log-sum-exp.
        dq: float32 ``[h, B * Q, D]``, any strides with ``stride(-1) == 1``; the q gradient is ADDED into it.
        dk, dv: ``[B, H, K, D]``, contiguous, in the inputs' dtype; the k / v gradients of the block's heads are
            ADDED into them (float32: atomically in place; float16 / bfloat16: through a float32 scratch
            ``[B, h, K, D]`` cast and added once; `sparse_bias.backends.triton.launch.KVAccumulator`).
        db: float32 ``[h, nnz]`` (unit last stride): STORES the score gradient ``ds_e`` of every entry, which
            is the gradient of per-head bias values (a shared-bias caller sums it over the heads).
    """
    h = lse.shape[0]
    nb, heads, nq, nk, dim = _sizes(q, k, v, indptr, h0, h)
    nnz = key.numel()
    if tuple(dq.shape) != (h, nb * nq, dim) or tuple(go.shape) != (h, nb * nq) or tuple(db.shape) != (h, nnz):
        raise ValueError(f"dq must be [h, B*Q, D] = {(h, nb * nq, dim)}, go [h, B*Q] and db [h, nnz]; got "
                         f"{tuple(dq.shape)}, {tuple(go.shape)}, {tuple(db.shape)}")
    if tuple(g.shape) != tuple(q.shape) or not g.is_contiguous():
        raise ValueError(f"g must be a contiguous {tuple(q.shape)} tensor")
    if dk.shape != k.shape or dv.shape != k.shape or not (dk.is_contiguous() and dv.is_contiguous()):
        raise ValueError("dk and dv must be contiguous [B, H, K, D] tensors")
    for t, name in ((dq, "dq"), (db, "db"), (go, "go"), (lse, "lse")):
        unit_last(t, name)
    if h == 0 or nb * nq == 0 or nnz == 0:
        return
    kern = _kernels()
    (bv, em, kp), (bv_s, em_s, kp_s), flags = _entry_operands(bvals, emask, keep, h, nnz, lse)
    kv = KVAccumulator.of(dk, dv, h0, h)
    kern.window_backward_kernel[(nb * nq, h)](q, k, v, g, go, lse, indptr, key, bv, em, kp, dq, kv.gk, kv.gv, db,
                                              nq, nk, heads, h0, dim, kv.heads, kv.first, float(scale),
                                              bv_s, em_s, kp_s, go.stride(0), lse.stride(0), dq.stride(0),
                                              dq.stride(1), db.stride(0),
                                              DP=next_power_of_2(dim), BLOCK=BLOCK, **flags)
    kv.flush()
