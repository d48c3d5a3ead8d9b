"""Exact sparse-bias attention: dense global scores from an unmodified kernel plus a sparse correction.

Per query and head, with scores ``s_j`` over all keys and a bias ``b_j`` on the window ``W``:

* dense pass (no bias): ``o_d = sum_j p_j v_j``, ``p_j = exp(s_j - L)``, ``L = logsumexp(s)``;
* sparse pass over ``W``: ``a_j = p_j expm1(b_j)``, ``S = sum_W a_j``, ``C = sum_W a_j v_j``;
* output ``o = (o_d + C) / (1 + S)`` -- exactly ``softmax(s + b) v``.

The backward calls the dense kernel's own backward with ``g / (1 + S)`` and the final output, which is
exact outside the windows, then adds the window terms (design brief, section 3).
"""
from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import torch

from .backends import BACKENDS, backend_candidates, get_backend
from .bias import ModalityBias, SparseBias
from .kernels import compute_dtype as _compute_dtype
from .kernels import dense_lse_backward, dense_lse_forward, dropout_mask, dropout_scale
from ._blocks import window_blocks
from ._validation import (additive_mask, check_dense_bias, check_dropout, check_modality_bias, check_qkv,
                          check_scale, check_sparse_bias, draw_seed)

__all__ = ["sparse_bias_attention", "dense_bias_attention", "select_backend", "EXACT_ROW_THRESHOLD"]

logger = logging.getLogger("sparse_bias")

BACKEND_NAMES = ("auto", "fused", "sparse", "scatter", "torch", "triton", "dense")

#: Rows whose normaliser ``1 + S`` falls below this (a negative bias removes more than 3/4 of the attention
#: mass) are recomputed densely, one small block of rows at a time: there ``o_d + C`` and ``1 + S`` cancel
#: and would amplify rounding errors by about ``1 / (1 + S)``. Non-finite normalisers (overflowing biases)
#: too. With AQR weights in [-1, 1] and scale 1 the normaliser stays above e^-1, so this path is rare.
EXACT_ROW_THRESHOLD = 0.25

#: Rows per block of the exact (dense) row path.
EXACT_ROW_CHUNK = 16


def select_backend(q: torch.Tensor, bias=None, backend: str = "auto") -> Tuple[str, str]:
    """The backend :func:`sparse_bias_attention` will use, and why.

    Args:
        q: the query tensor (its device and dtype decide).
        bias: the bias argument (a dense tensor or None always takes the dense/plain path).
        backend: the requested backend.

    Returns:
        ``(name, reason)``.

    Example::

        >>> win = local_windows(KeyLayout(bev_shape=(4, 4)), torch.tensor([[[1, 1]]]), None, 3)
        >>> name, why = select_backend(torch.zeros(1, 2, 1, 8), window_bias(win, torch.ones(1, 1), None))
        >>> name in ("fused", "sparse")         # on a CPU: the compiled kernels when built, else PyTorch's CSR kernels
        True
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if bias is None:
        return "none", "no bias: plain attention through the dense kernel"
    if isinstance(bias, torch.Tensor):
        return "dense", "a dense bias tensor is added to the scores (the origin design's path)"
    if isinstance(bias, ModalityBias):
        if backend == "dense":
            return "dense", "requested: the bias is materialised"
        return "modality", "one bias per modality: one dense pass per key range, combined by log-sum-exp"
    if backend == "dense":
        return "dense", "requested: the bias is materialised"
    candidates = backend_candidates(q.device, q.dtype)
    if backend != "auto":
        ok, why = BACKENDS[backend].can_run(q.device, q.dtype)
        if not ok:
            raise RuntimeError(f"backend {backend!r} cannot run here: {why}")
        return backend, f"requested: {why}"
    for name, ok, why in candidates:
        if ok:
            skipped = "; ".join(f"{n}: {w}" for n, o, w in candidates if not o)
            return name, f"auto on {q.device.type}/{q.dtype}: {why}" + (f" (skipped {skipped})" if skipped else "")
    raise RuntimeError("no sparse backend can run: " + "; ".join(f"{n}: {w}" for n, _, w in candidates))


# ---------------------------------------------------------------------------------------------------
# exact rows: a dense evaluation of the few rows where the correction would cancel


def _rows_forward(qr, kb, vb, values, win, mask, scale, dropout_p, seed, b, rows):
    """Dense biased attention of queries ``rows`` (sorted LongTensor) of batch element ``b``.

    ``qr [H, R, D]`` are their queries, ``kb``, ``vb [H, K, D]`` the keys and values of ``b``. Returns
    ``([H, R, D]`` in the compute dtype, the window entries of these rows``)``; differentiable.
    """
    cdt = _compute_dtype(qr.dtype)
    heads, nk = qr.shape[0], kb.shape[1]
    s = torch.matmul(qr.to(cdt), kb.to(cdt).transpose(-1, -2)) * scale                     # [H, R, K]
    if mask is not None:
        m = mask[b if mask.shape[0] > 1 else 0]
        s = s + (m[:, rows] if m.shape[1] > 1 else m)
    flat_rows = b * win.num_queries + rows
    entries = torch.isin(win.row, flat_rows).nonzero().flatten()
    local = torch.searchsorted(flat_rows, win.row[entries])
    vals = values[entries].to(cdt)
    vals = vals.t() if vals.dim() == 2 else vals.unsqueeze(0).expand(heads, -1)
    s = s.index_put((torch.arange(heads, device=qr.device).unsqueeze(1), local.unsqueeze(0),
                     win.key[entries].unsqueeze(0)), vals, accumulate=True)
    p = torch.softmax(s, dim=-1)
    if dropout_p > 0:
        p = p * dropout_scale(seed, dropout_p, b, torch.arange(heads, device=qr.device).view(-1, 1, 1),
                              rows.view(1, -1, 1), torch.arange(nk, device=qr.device), heads, win.num_queries, nk,
                              cdt)
    return torch.matmul(p, vb.to(cdt)), entries


def _exact_rows(flagged: torch.Tensor):
    """``(b, rows)`` blocks of the flagged ``[B, Q]`` rows."""
    for b in range(flagged.shape[0]):
        rows = flagged[b].nonzero().flatten()
        for i in range(0, rows.numel(), EXACT_ROW_CHUNK):
            yield b, rows[i:i + EXACT_ROW_CHUNK]


# ---------------------------------------------------------------------------------------------------
# autograd


class _SparseBiasAttention(torch.autograd.Function):
    """Forward and exact backward of the dense pass plus the sparse window correction."""

    @staticmethod
    def forward(ctx, q, k, v, values, win, mask, scale, backend, dropout_p, seed):
        cdt = _compute_dtype(q.dtype)
        bsz, heads, nq, _ = q.shape
        o_d, lse, kernel = dense_lse_forward(q, k, v, mask, scale, dropout_p, seed)
        ctx.kernel, ctx.scale, ctx.backend, ctx.dropout_p, ctx.seed = kernel, scale, backend, dropout_p, seed
        ctx.win, ctx.mask, ctx.shared = win, mask, values is not None and values.dim() == 1
        if win is None or win.nnz == 0:
            ctx.sparse = False
            ctx.values_like = None if values is None else (values.shape, values.dtype)
            ctx.save_for_backward(q, k, v, o_d, lse)
            return o_d
        ctx.sparse = True
        p = torch.empty(heads, win.nnz, dtype=cdt, device=q.device) if backend.saves_p else None
        den = torch.ones(bsz, heads, nq, dtype=cdt, device=q.device)
        out = o_d.to(cdt)
        for blk in window_blocks(win, values, backend, heads, k.shape[2], mask, dropout_p, seed, cdt):
            backend.forward_block(win, blk, q, k, v, lse[blk.b, blk.hs].to(cdt), scale,
                                  None if p is None else p[blk.hs, blk.e0:blk.e1], den[blk.b, blk.hs],
                                  out[blk.b, blk.hs], cdt)
        out /= den.unsqueeze(-1)
        flagged = ~(den > EXACT_ROW_THRESHOLD).all(dim=1) | ~torch.isfinite(den).all(dim=1)  # [B, Q]
        ctx.any_flagged = bool(flagged.any())
        if ctx.any_flagged:
            for b, rows in _exact_rows(flagged):
                out[b, :, rows] = _rows_forward(q[b, :, rows], k[b], v[b], values.detach(), win, mask, scale,
                                                dropout_p, seed, b, rows)[0]
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, values, p, den, flagged)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.sparse:
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = dense_lse_backward(ctx.kernel, grad_out, q, k, v, out, lse, ctx.mask, ctx.scale,
                                            ctx.dropout_p, ctx.seed)
            dvalues = None
            if ctx.values_like is not None and ctx.needs_input_grad[3]:       # empty windows: a zero gradient
                dvalues = torch.zeros(ctx.values_like[0], dtype=ctx.values_like[1], device=q.device)
            return dq, dk, dv, dvalues, None, None, None, None, None, None
        q, k, v, out, lse, values, p, den, flagged = ctx.saved_tensors
        win, backend, scale, mask = ctx.win, ctx.backend, ctx.scale, ctx.mask
        cdt = _compute_dtype(q.dtype)
        bsz, heads, nq, _ = q.shape
        gp = grad_out.to(cdt) / den.unsqueeze(-1)                                          # g' = g / (1 + S)
        if ctx.any_flagged:
            gp = gp.masked_fill(flagged.view(bsz, 1, nq, 1), 0.0)
        dq, dk, dv = dense_lse_backward(ctx.kernel, gp.to(q.dtype), q, k, v, out, lse, mask, scale,
                                        ctx.dropout_p, ctx.seed)
        dq = dq.to(cdt)
        if backend.needs_contiguous:             # kernels that address the gradient buffers directly
            dq, dk, dv = dq.contiguous(), dk.contiguous(), dv.contiguous()

        dvalues = torch.zeros_like(values, dtype=cdt) if ctx.needs_input_grad[3] else None
        go = (gp * out.to(cdt)).sum(-1)                                                    # <g', o> [B, H, Q]
        for blk in window_blocks(win, values.detach(), backend, heads, k.shape[2], mask, ctx.dropout_p, ctx.seed,
                                 cdt):
            hs, e0, e1 = blk.hs, blk.e0, blk.e1
            db = backend.backward_block(win, blk, q, k, v, gp, go[blk.b, hs], None if p is None else p[hs, e0:e1],
                                        lse[blk.b, hs].to(cdt), scale, dq[blk.b, hs], dk, dv, cdt)
            if dvalues is not None:
                if ctx.shared:
                    dvalues[e0:e1] += db.sum(0)
                else:
                    dvalues[e0:e1, hs] = db.t()

        if ctx.any_flagged:   # the dense rows, differentiated by autograd
            for b, rows in _exact_rows(flagged):
                with torch.enable_grad():
                    qr, kb, vb, vals = (t.detach().requires_grad_() for t in (q[b, :, rows], k[b], v[b], values))
                    o_rows, entries = _rows_forward(qr, kb, vb, vals, win, mask, scale, ctx.dropout_p, ctx.seed,
                                                    b, rows)
                    gq, gk, gv, gval = torch.autograd.grad(o_rows, (qr, kb, vb, vals), grad_out[b, :, rows].to(cdt))
                dq[b, :, rows] += gq.to(cdt)
                dk[b] += gk.to(dk.dtype)
                dv[b] += gv.to(dv.dtype)
                if dvalues is not None:
                    dvalues[entries] = gval[entries].to(cdt)
        dq = dq.to(q.dtype)
        if dvalues is not None:
            dvalues = dvalues.to(values.dtype)
        return dq, dk, dv, dvalues, None, None, None, None, None, None


class _ModalityBiasAttention(torch.autograd.Function):
    """Exact attention with one bias per (query, modality) over all keys of the modality.

    Per modality ``m`` (a key range): ``(o_m, L_m)`` from the dense kernel on its keys; with
    ``z_m = L_m + c_m`` and ``w = softmax_m(z)``, ``o = sum_m w_m o_m``. Backward: the kernel's own backward
    on each range with ``grad_out = w_m g`` and ``out = o`` (exact: ``ds_j = p_j w_m (<g, v_j> - <g, o>)``),
    and ``dc_m = w_m (<g, o_m> - <g, o>)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, values, ranges, mask, scale, dropout_p, seed):
        cdt = _compute_dtype(q.dtype)
        nk = k.shape[2]
        outs, lses, kernels_used = [], [], []
        for start, end in ranges:
            m = None if mask is None else (mask[..., start:end] if mask.shape[-1] > 1 else mask)
            o_m, lse_m, kern = dense_lse_forward(q, k[:, :, start:end], v[:, :, start:end], m, scale, dropout_p, seed,
                                                 key_range=(start, nk))
            outs.append(o_m)
            lses.append(lse_m.to(cdt))
            kernels_used.append(kern)
        c = values.to(cdt)
        c = c.unsqueeze(1) if c.dim() == 3 else c.permute(0, 3, 1, 2)                       # [B, H|1, Q, M]
        w = torch.softmax(torch.stack(lses, dim=-1) + c, dim=-1)                            # [B, H, Q, M]
        w = torch.nan_to_num(w, nan=0.0)                                                    # fully masked rows
        out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=cdt, device=q.device)
        for i, o_m in enumerate(outs):
            out += w[..., i:i + 1] * torch.nan_to_num(o_m.to(cdt))
        out = out.to(q.dtype)
        ctx.ranges, ctx.mask, ctx.scale, ctx.dropout_p, ctx.seed = ranges, mask, scale, dropout_p, seed
        ctx.kernels, ctx.shared = kernels_used, values.dim() == 3
        ctx.save_for_backward(q, k, v, out, w, *outs, *lses)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, w, *rest = ctx.saved_tensors
        n = len(ctx.ranges)
        outs, lses = rest[:n], rest[n:]
        cdt = _compute_dtype(q.dtype)
        nk = k.shape[2]
        g = grad_out.to(cdt)
        go = (g * out.to(cdt)).sum(-1)
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dc = []
        for i, (start, end) in enumerate(ctx.ranges):
            m = None if ctx.mask is None else (ctx.mask[..., start:end] if ctx.mask.shape[-1] > 1 else ctx.mask)
            wi = w[..., i]
            dq_m, dk[:, :, start:end], dv[:, :, start:end] = dense_lse_backward(
                ctx.kernels[i], (wi.unsqueeze(-1) * g).to(q.dtype), q, k[:, :, start:end], v[:, :, start:end], out,
                lses[i], m, ctx.scale,
                ctx.dropout_p, ctx.seed, key_range=(start, nk))
            dq += dq_m.to(cdt)
            dc.append(wi * ((g * torch.nan_to_num(outs[i].to(cdt))).sum(-1) - go))          # [B, H, Q]
        dc = torch.stack(dc, dim=-1)                                                        # [B, H, Q, M]
        dvalues = dc.sum(1) if ctx.shared else dc.permute(0, 2, 3, 1)
        return dq.to(q.dtype), dk, dv, dvalues, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# public functions


def dense_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense_bias: Optional[torch.Tensor] = None,
                         key_padding_mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                         dropout_p: float = 0.0, scale: Optional[float] = None,
                         dropout_seed: Optional[int] = None) -> torch.Tensor:
    """The dense reference: ``softmax(q k^T * scale + dense_bias + masks) v``, written out plainly.

    Materialises the ``[B, H, Q, K]`` scores (the origin design's memory cost). Computed in the inputs'
    dtype, so it is also the "naive implementation at the same precision" for tolerance checks.

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]``.
        dense_bias: ``[B, Q, K]`` (shared by heads) or ``[B, H, Q, K]``, or None.
        key_padding_mask: bool ``[B, K]``, True = ignore that key.
        attn_mask: bool (True = attend, the SDPA convention) or additive float, broadcastable to ``[B, H, Q, K]``.
        dropout_p: attention dropout on the probabilities, with the counter-based mask of
            :func:`sparse_bias.kernels.dropout_keep` (``dropout_seed`` drawn from torch's RNG when None).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, Q, D]``.
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q)
    check_dropout(dropout_p)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if dense_bias is not None:
        check_dense_bias(dense_bias, q, k)
        scores = scores + (dense_bias.unsqueeze(1) if dense_bias.dim() == 3 else dense_bias).to(scores.dtype)
    mask = additive_mask(q, k, key_padding_mask, attn_mask)
    if mask is not None:
        scores = scores + mask.to(scores.dtype)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        seed = draw_seed() if dropout_seed is None else int(dropout_seed)
        probs = probs * dropout_mask(seed, probs.shape, dropout_p, q.device).to(probs.dtype) / (1 - dropout_p)
    return torch.matmul(probs, v)


def sparse_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          bias: Union[SparseBias, torch.Tensor, None] = None, *,
                          key_padding_mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                          dropout_p: float = 0.0, scale: Optional[float] = None, backend: str = "auto",
                          dropout_seed: Optional[int] = None) -> torch.Tensor:
    """Attention with a local additive bias, exact in forward and backward.

    Computes ``softmax(q k^T * scale + bias.to_dense() [+ masks]) v`` as dense global scores from an
    unmodified flash kernel plus an exact sparse correction over the window entries -- without ever
    materialising ``[B, (H,) Q, K]``.

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]`` (float32/float64/bfloat16/float16, one device).
        bias: a :class:`SparseBias` (values ``[nnz]`` shared by heads or ``[nnz, H]``), a dense tensor
            ``[B, Q, K]`` / ``[B, H, Q, K]`` (taken through the dense path), or None (plain attention).
        key_padding_mask: ``[B, K]``: bool (True = ignore that key, the mmcv / nn.MultiheadAttention
            convention), uint8 (nonzero = ignore) or an additive float mask (all zeros = no mask, no cost).
        attn_mask: dense bool (True = attend, the ``scaled_dot_product_attention`` convention) or additive
            float mask broadcastable to ``[B, H, Q, K]``; not differentiated.
        dropout_p: attention dropout on the final (biased) probabilities, as in the dense reference; each
            (b, h, q, key) is kept or dropped by a counter-based hash of ``dropout_seed`` (drawn from torch's
            RNG when None), so the dense pass, the correction and the backward agree. The dense pass then
            runs on the chunked PyTorch kernel. Pass 0 at evaluation (modules do this for you).
        scale: softmax scale, default ``1 / sqrt(D)``.
        backend: ``"auto"``, ``"fused"`` (the compiled C++/OpenMP kernels, CPU), ``"sparse"`` (PyTorch sparse CSR
            kernels), ``"triton"`` (fused Triton kernels, CUDA), ``"scatter"`` (torch-scatter segment
            ops), ``"torch"`` (native gather + index_add) or ``"dense"`` (materialise the bias; the reference).
            :func:`select_backend` says what ``"auto"`` picks and why.

    Returns:
        ``[B, H, Q, D]`` in q's dtype. Gradients flow to q, k, v and ``bias.values`` (hence to the weights
        and scale behind them). The correction is accumulated in float32 (float64 for float64 input).

    Example::

        >>> layout = KeyLayout(bev_shape=(8, 8))
        >>> win = local_windows(layout, torch.tensor([[[2, 3], [5, 5]]]), None, bev_window=3)
        >>> bias = window_bias(win, torch.tensor([[1.0, -2.0]]), None)
        >>> q, k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 64, 4), torch.randn(1, 2, 64, 4)
        >>> out = sparse_bias_attention(q, k, v, bias)
        >>> ref = dense_bias_attention(q, k, v, bias.to_dense())
        >>> torch.allclose(out, ref, atol=1e-5)
        True
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q)
    check_dropout(dropout_p)
    if bias is not None and not isinstance(bias, (SparseBias, ModalityBias, torch.Tensor)):
        raise TypeError(f"bias must be a SparseBias, a ModalityBias, a dense tensor or None, "
                        f"got {type(bias).__name__}")
    if isinstance(bias, SparseBias):
        check_sparse_bias(bias, q, k)
    if isinstance(bias, ModalityBias):
        check_modality_bias(bias, q, k)
    name, why = select_backend(q, bias, backend)
    logger.debug("sparse_bias_attention: backend %s (%s)", name, why)
    seed = 0 if dropout_p == 0 else (draw_seed() if dropout_seed is None else int(dropout_seed))
    if name == "dense":
        dense = bias if isinstance(bias, torch.Tensor) else bias.to_dense()
        return dense_bias_attention(q, k, v, dense, key_padding_mask, attn_mask, dropout_p, scale, seed)
    mask = additive_mask(q, k, key_padding_mask, attn_mask)
    if q.shape[2] == 0:
        return q.new_zeros(q.shape[:3] + (v.shape[-1],)) + 0 * q.sum()
    if name == "none":
        return _SparseBiasAttention.apply(q, k, v, None, None, mask, scale, None, dropout_p, seed)
    if name == "modality":
        return _ModalityBiasAttention.apply(q, k, v, bias.values, bias.ranges, mask, scale, dropout_p, seed)
    return _SparseBiasAttention.apply(q, k, v, bias.values, bias.index, mask, scale, get_backend(name),
                                      dropout_p, seed)
