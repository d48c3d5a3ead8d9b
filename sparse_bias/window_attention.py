"""Window attention: exact attention restricted to each query's window keys (a local attention mask).

``window_attention(q, k, v, win)`` equals ``softmax(q k^T * scale + bias + M) v`` where ``M`` is 0 for the
keys in a query's windows and ``-inf`` elsewhere -- ``scaled_dot_product_attention`` with MoME's dense
local attention mask (LAM) -- in O(nnz * D) time and memory: scores are computed only at the window entries
(SDDMM), the softmax runs over each query's CSR segment (segment max and sum) and the values are summed by a
sparse-dense product. No ``[B, (H,) Q, K]`` tensor exists at any point.

Backward, with ``p`` the window probabilities (times the dropout multipliers ``keep`` where dropped),
``ds_j = p_j (keep_j <g, v_j> - <g, o>)``: ``dq = scale sum_j ds_j k_j``, ``dk_j += scale ds_j q``,
``dv_j += p_j keep_j g`` and ``d bias_j = ds_j``.
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from ._blocks import window_blocks
from ._validation import (additive_mask, check_dropout, check_qkv, check_scale, check_sparse_bias,
                          zeros_like_output)
from ._validation import dropout_seed as _call_seed
from .backends import get_backend
from .backends.choose import choose_backend
from .bias import SparseBias
from .kernels import compute_dtype, dropout_mask, unit_stride
from .windows import WindowIndex

__all__ = ["window_attention", "select_window_backend"]

logger = logging.getLogger("sparse_bias")

#: Backends `window_attention` accepts.
WINDOW_BACKENDS = ("auto", "fused", "sparse", "scatter", "torch", "dense")


def select_window_backend(q: torch.Tensor, backend: str = "auto") -> Tuple[str, str]:
    """The backend `window_attention` will use for ``q``, and why: ``(name, reason)``.

    ``"auto"`` takes the first backend of `sparse_bias.backends.AUTO_ORDER` that can run on q's device
    and dtype and has segment kernels (the fused ``"triton"`` backend has none for window attention yet).
    """
    if backend not in WINDOW_BACKENDS:
        raise ValueError(f"backend must be one of {WINDOW_BACKENDS}, got {backend!r}")
    if backend == "dense":
        return "dense", "requested: the dense mask is materialised (the reference)"
    return choose_backend(q.device, q.dtype, q.shape[-1], backend, "window")


def _check_window(win, q, k):
    if not isinstance(win, WindowIndex):
        raise TypeError(f"win must be a WindowIndex (the local attention mask), got {type(win).__name__}")
    bsz, _, nq, _ = q.shape
    if (win.batch_size, win.num_queries) != (bsz, nq):
        raise ValueError(f"win is for [B, Q] = [{win.batch_size}, {win.num_queries}] but q [B, H, Q, D] gives "
                         f"[{bsz}, {nq}]")
    if win.layout.num_keys != k.shape[2]:
        raise ValueError(f"win indexes a layout of {win.layout.num_keys} keys ({win.layout!r}) but k [B, H, K, D] "
                         f"has K = {k.shape[2]}")
    if win.device != q.device:
        raise ValueError(f"win is on {win.device} but q is on {q.device}")
    win.validate()                                    # keys in range, ascending, unique: once per index object


def _check_bias_index(bias, win):
    if not isinstance(bias, SparseBias):
        raise TypeError(f"bias must be a SparseBias on the window index or None, got {type(bias).__name__}")
    idx = bias.index
    if idx is win:
        return
    same = (idx.nnz == win.nnz and idx.num_rows == win.num_rows and torch.equal(idx.indptr, win.indptr)
            and torch.equal(idx.key, win.key))
    if not same:
        raise ValueError(f"bias is defined on another window index ({idx!r}) than win ({win!r}); build both "
                         "from the same WindowIndex")


class _WindowAttention(torch.autograd.Function):
    """Forward and exact backward of attention restricted to the window entries."""

    @staticmethod
    def forward(ctx, q, k, v, values, win, mask, scale, backend, dropout_p, seed):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)       # the kernels' layout (docs/conventions.md)
        cdt = compute_dtype(q.dtype)
        bsz, heads, nq, _ = q.shape
        nk = k.shape[2]
        # the state for the backward: the window probabilities [H, nnz], or (fused backends) the log-sum-exp [B, H, Q]
        p = (torch.empty(heads, win.nnz, dtype=cdt, device=q.device) if backend.saves_p
             else torch.empty(bsz, heads, nq, dtype=cdt, device=q.device))
        out = torch.zeros(bsz, heads, nq, v.shape[-1], dtype=cdt, device=q.device)
        for blk in window_blocks(win, values, backend, heads, nk, mask, dropout_p, seed, cdt):
            state = p[blk.hs, blk.e0:blk.e1] if backend.saves_p else p[blk.b, blk.hs]
            backend.window_forward_block(win, blk, q, k, v, scale, state, out[blk.b, blk.hs], cdt)
        out = out.to(q.dtype)
        ctx.win, ctx.mask, ctx.scale, ctx.backend, ctx.dropout_p, ctx.seed = win, mask, scale, backend, dropout_p, seed
        ctx.values_meta = None if values is None else (values.dim() == 1, values.dtype)
        ctx.values = None if values is None or backend.saves_p else values.detach()   # fused: scores recomputed
        ctx.save_for_backward(q, k, v, out, p)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, p = ctx.saved_tensors
        win, backend, scale = ctx.win, ctx.backend, ctx.scale
        cdt = compute_dtype(q.dtype)
        heads, nk = q.shape[1], k.shape[2]
        g = unit_stride(grad_out.to(cdt))
        go = (g * out.to(cdt)).sum(-1)                                                   # <g, o> [B, H, Q]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk, dv = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))  # the kernels' layout
        want_values = ctx.values_meta is not None and ctx.needs_input_grad[3]
        ds_all = torch.empty(heads, win.nnz, dtype=cdt, device=q.device) if want_values else None
        for blk in window_blocks(win, ctx.values, backend, heads, nk, ctx.mask, ctx.dropout_p, ctx.seed, cdt):
            state = p[blk.hs, blk.e0:blk.e1] if backend.saves_p else p[blk.b, blk.hs]
            ds = backend.window_backward_block(win, blk, q, k, v, g, go[blk.b, blk.hs], state, scale,
                                               dq[blk.b, blk.hs], dk, dv, cdt)
            if ds_all is not None:
                ds_all[blk.hs, blk.e0:blk.e1] = ds
        dvalues = None
        if ds_all is not None:
            shared, vdtype = ctx.values_meta
            dvalues = (ds_all.sum(0) if shared else ds_all.t()).to(vdtype)
        return dq.to(q.dtype), dk, dv, dvalues, None, None, None, None, None, None


def _dense_window_attention(q, k, v, win, bias, mask, dropout_p, scale, seed):
    """The reference: the dense ``[B, Q, K]`` mask and bias materialised; fully masked rows give zeros."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        dense = bias.to_dense()
        scores = scores + (dense.unsqueeze(1) if dense.dim() == 3 else dense).to(scores.dtype)
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    scores = scores.masked_fill(~win.to_dense_mask().unsqueeze(1), float("-inf"))
    valid = torch.isfinite(scores).any(-1, keepdim=True)                                 # [B, H, Q, 1]
    probs = torch.softmax(scores.masked_fill(~valid, 0.0), dim=-1) * valid
    if dropout_p > 0:
        probs = probs * dropout_mask(seed, probs.shape, dropout_p, q.device).to(probs.dtype) / (1 - dropout_p)
    return torch.matmul(probs, v)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win: WindowIndex,
                     bias: Optional[SparseBias] = None, *, key_padding_mask: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, scale: Optional[float] = None, backend: str = "auto",
                     dropout_seed: Optional[int] = None) -> torch.Tensor:
    """Attention over each query's window keys only: the local attention mask (LAM), exact, in O(nnz * D).

    Equals ``softmax(q k^T * scale + bias.to_dense() + M) v`` with ``M = 0`` inside the windows of ``win`` and
    ``-inf`` outside -- i.e. ``scaled_dot_product_attention`` with the dense bool mask ``win.to_dense_mask()``
    -- in forward and backward (q, k, v and ``bias.values``), without any ``[B, (H,) Q, K]`` tensor.

    A query whose window is empty, or whose window keys are all padded, gets a **zero output and zero
    gradients** -- the library's convention for fully masked rows on every op and backend (docs/conventions.md).
    q, k, v and the output gradient may have any strides; those whose last dim is not unit-stride are copied.
    The index is validated on its first use (keys in range, ascending and unique per query).

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]`` (float32/float64/bfloat16/float16, one device).
        win: the `WindowIndex` (``B``, ``Q`` and the layout's ``K`` must match q and k). A
            ``WindowIndex`` built with ``bev_window=5, cam_window=15`` from MoME-style projections is MoME's LAM.
        bias: optional `SparseBias` on the same index (values ``[nnz]`` or ``[nnz, H]``): a local bias
            inside the local mask.
        key_padding_mask: ``[B, K]``: bool (True = ignore that key), uint8 (nonzero = ignore) or an additive
            float mask (``torch.nn.MultiheadAttention``'s conventions).
        dropout_p: attention dropout on the window probabilities, with the counter-based mask of
            `sparse_bias.sparse_bias_attention` (the same decisions as the dense reference for the same
            ``dropout_seed``; drawn from torch's RNG when None). Pass 0 at evaluation.
        scale: softmax scale, default ``1 / sqrt(D)``; a finite number.
        backend: ``"auto"``, ``"fused"`` (the compiled C++/OpenMP kernels, CPU), ``"sparse"`` (PyTorch CSR kernels:
            ``sampled_addmm``, CSR @ dense), ``"scatter"``
            (gathered rows reduced with torch-scatter ``segment_csr``), ``"torch"`` (gathers, ``index_add_``,
            ``scatter_reduce``) or ``"dense"`` (the materialised mask; the reference).
            `select_window_backend` says what ``"auto"`` picks and why.

    Returns:
        ``[B, H, Q, D]`` in q's dtype; softmax statistics are kept in float32 (float64 for float64 input).

    Example:
        >>> import torch, sparse_bias as sb
        >>> layout = sb.KeyLayout(bev_shape=(8, 8))
        >>> win = sb.local_windows(layout, torch.tensor([[[2, 3], [5, 5]]]), None, bev_window=3)
        >>> q, k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 64, 4), torch.randn(1, 2, 64, 4)
        >>> out = sb.window_attention(q, k, v, win)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=win.to_dense_mask()[:, None])
        >>> torch.allclose(out, ref, atol=1e-5)
        True
    """
    check_qkv(q, k, v)
    _check_window(win, q, k)
    scale = check_scale(scale, q)
    check_dropout(dropout_p)
    if bias is not None:
        _check_bias_index(bias, win)
        check_sparse_bias(bias, q, k)
    mask = additive_mask(q, k, key_padding_mask, None)                         # [B, 1, 1, K] or None
    name, why = select_window_backend(q, backend)
    logger.debug("window_attention: backend %s (%s)", name, why)
    seed = _call_seed(dropout_p, dropout_seed)
    if name == "dense":
        return _dense_window_attention(q, k, v, win, bias, mask, dropout_p, scale, seed)
    if win.nnz == 0 or q.numel() == 0:  # every window empty, or nothing to attend: zeros (zero gradients)
        return zeros_like_output(q, k, v, None if bias is None else bias.values)
    values = None if bias is None else bias.values
    return _WindowAttention.apply(q, k, v, values, win, mask, scale, get_backend(name), dropout_p, seed)
