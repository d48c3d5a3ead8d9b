"""The dense references, written out plainly: the bias (and for window attention the local mask) materialised.

Computed in the inputs' dtype, so they are also the "naive implementation at the same precision" the precision
bound (`sparse_bias._core.precision`) measures. A fully masked row gives zeros and zero gradients (docs/conventions.md).
"""
from __future__ import annotations

from typing import Optional

import torch

from .call import Call
from ..dense.dropout import dropout_mask

__all__ = ["dense_attention", "dense_window_attention"]


def _softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim; a row that is ``-inf`` everywhere gives zeros (and zero gradients)."""
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def _attend(scores: torch.Tensor, v: torch.Tensor, call: Call) -> torch.Tensor:
    if call.mask is not None:
        scores = scores + call.mask.to(scores.dtype)
    probs = _softmax_rows(scores)
    if call.dropout_p > 0:
        keep = dropout_mask(call.seed, probs.shape, call.dropout_p, v.device)
        probs = probs * keep.to(probs.dtype) / (1 - call.dropout_p)
    return torch.matmul(probs, v)


def dense_attention(q, k, v, dense_bias: Optional[torch.Tensor], call: Call) -> torch.Tensor:
    """``softmax(q k^T * scale + dense_bias + mask) v`` (dropout with the counter hash): ``[B, H, Q, D]``.
    ``dense_bias`` is ``[B, Q, K]``, ``[B, H|1, Q, K]`` or None."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    if dense_bias is not None:
        scores = scores + (dense_bias.unsqueeze(1) if dense_bias.dim() == 3 else dense_bias).to(scores.dtype)
    return _attend(scores, v, call)


def dense_window_attention(q, k, v, win, bias, call: Call) -> torch.Tensor:
    """`dense_attention` restricted to the keys of ``win`` (the dense ``[B, Q, K]`` mask); ``bias`` a
    `sparse_bias.SparseBias` on ``win`` or None."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * call.scale
    if bias is not None:
        dense = bias.to_dense()
        scores = scores + (dense.unsqueeze(1) if dense.dim() == 3 else dense).to(scores.dtype)
    scores = scores.masked_fill(~win.to_dense_mask().unsqueeze(1), float("-inf"))
    return _attend(scores, v, call)
