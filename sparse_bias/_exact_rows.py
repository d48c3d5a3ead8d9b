"""The exact-row path of the correction: a dense evaluation of the few rows where it would cancel.

Rows whose normaliser ``1 + S`` falls below `EXACT_ROW_THRESHOLD` (a negative bias removes more than
3/4 of the attention mass) are recomputed densely, one small block of rows at a time: there ``o_d + C`` and
``1 + S`` cancel and would amplify rounding errors by about ``1 / (1 + S)``. Non-finite normalisers
(overflowing biases) too. With AQR weights in [-1, 1] and scale 1 the normaliser stays above e^-1, so this
path is rare.
"""
from __future__ import annotations

import torch

from ._call import Call
from .dense.dropout import dropout_scale

#: Rows whose normaliser ``1 + S`` falls below this are recomputed densely (see the module docstring).
EXACT_ROW_THRESHOLD = 0.25

#: Rows per block of the exact (dense) row path.
EXACT_ROW_CHUNK = 16


def flagged_rows(den: torch.Tensor) -> torch.Tensor:
    """``[B, Q]`` bool: the rows of the normaliser ``den [B, H, Q]`` that take the exact path."""
    return ~(den > EXACT_ROW_THRESHOLD).all(dim=1) | ~torch.isfinite(den).all(dim=1)


def rows_forward(qkv, values, win, call: Call, b: int, rows: torch.Tensor):
    """Dense biased attention of queries ``rows`` (sorted LongTensor) of batch element ``b``.

    ``qkv = (q [H, R, D], k [H, K, D], v [H, K, D])``: the queries of these rows and the keys and values of ``b``.
    Returns ``([H, R, D]`` in the compute dtype, the window entries of these rows``)``; differentiable. A fully
    masked head of a row gives zeros (docs/conventions.md).
    """
    qr, kb, vb = qkv
    cdt, mask = call.cdt, call.mask
    heads, nk = qr.shape[0], kb.shape[1]
    s = torch.matmul(qr.to(cdt), kb.to(cdt).transpose(-1, -2)) * call.scale                # [H, R, K]
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
    empty = torch.isneginf(s).all(-1, keepdim=True)                    # a fully masked head: zeros (conventions)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    if call.dropout_p > 0:
        index = (b, torch.arange(heads, device=qr.device).view(-1, 1, 1), rows.view(1, -1, 1),
                 torch.arange(nk, device=qr.device))
        p = p * dropout_scale(call.seed, call.dropout_p, index, (None, heads, win.num_queries, nk), cdt)
    return torch.matmul(p, vb.to(cdt)), entries


def exact_row_blocks(flagged: torch.Tensor):
    """``(b, rows)`` blocks of the flagged ``[B, Q]`` rows."""
    for b in range(flagged.shape[0]):
        rows = flagged[b].nonzero().flatten()
        for i in range(0, rows.numel(), EXACT_ROW_CHUNK):
            yield b, rows[i:i + EXACT_ROW_CHUNK]
