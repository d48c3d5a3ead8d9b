"""The references the tests compare the library against, written out plainly in one place.

Attention (`attention`): ``softmax(q k^T * scale + bias + masks) v`` with the dense bias and masks materialised,
dropout applied as the keep decisions of the counter hash; `sparse_bias_attention` and `window_attention` take the
library's arguments (bias objects through their ``to_dense()``; for window attention the keys outside the windows
blocked). Computed in the inputs' dtype (float64 in the exactness tests). A query row whose scores are all ``-inf``
(every key padded or blocked, an empty window, ``K = 0``) gives output 0 and zero gradients (docs/conventions.md).

Biases and masks from a `sparse_bias.WindowIndex`, built from ``indptr`` / ``key`` alone, not from the library's
``to_dense()`` / ``to_dense_mask()``: `dense_from_entries`, `window_mask`; `window_values` recomputes the values of
`sparse_bias.window_bias` from the weights, `modality_dense` the dense form of a `sparse_bias.ModalityBias`.

Loop-based, slow on purpose: `window_entries` enumerates a query's windows cell by cell, `dense_bias` fills the
dense bias of `sparse_bias.window_bias` entry by entry.

Profiles: `FORMULAS` writes out the formula of every registered profile (docs/conventions.md, "Bias profiles")
independently of `sparse_bias.profiles`; a new profile adds its formula there (tests/test_bias.py checks that the
registry, the docs and `FORMULAS` name the same profiles).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

import sparse_bias as sb
from sparse_bias.dense import dropout_mask
from sparse_bias.profiles import PROFILES

__all__ = ["FORMULAS", "attention", "default_sigma", "dense_bias", "dense_from_entries", "entry_rows", "falloff",
           "fully_masked_rows", "modality_dense", "scores", "sparse_bias_attention", "window_attention",
           "window_entries", "window_mask", "window_values"]

INF = float("inf")

# ---- profiles --------------------------------------------------------------------------------------------------

#: The formula ``f(dy, dx, sigma)`` of every registered profile, written out independently of `sparse_bias.profiles`.
FORMULAS: Dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "flat": lambda dy, dx, sigma: torch.ones_like(dy),
    "gaussian": lambda dy, dx, sigma: torch.exp(-(dy ** 2 + dx ** 2) / (2 * sigma * sigma)),
}


def falloff(profile: str, dy: torch.Tensor, dx: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``f(dy, dx, sigma)`` of ``profile`` from `FORMULAS`, element-wise on float tensors of one shape."""
    if profile not in FORMULAS:
        raise KeyError(f"profile {profile!r} has no formula in tests/reference.py FORMULAS: write it out there "
                       f"(registered: {tuple(PROFILES)})")
    return FORMULAS[profile](dy, dx, sigma)


def default_sigma(size) -> float:
    """The default profile width of a window of ``size`` cells: half its half-size, at least 1/2."""
    return max(int(size) // 2, 1) / 2


# ---- windows and biases, loop by loop (slow on purpose) --------------------------------------------------------


def window_entries(layout, bev_pos, cam_pos, bev_window, cam_window, b, q):
    """Sorted list of ``(key, source, dy, dx)`` in the windows of query ``(b, q)``: source 0 = BEV, 1 = camera,
    ``(dy, dx)`` the offset from the window centre. ``bev_pos [B, Q, 2]``, ``cam_pos [B, Q, 3]`` or
    ``[B, Q, M, 3]`` (None for a missing modality; a row / view < 0 has no window); the window sizes odd ints or
    0, or LongTensors ``[B, Q]`` of them."""
    out = []

    def size_of(window):
        return int(window[b, q]) if isinstance(window, torch.Tensor) else int(window)

    if bev_pos is not None:
        row, col = (int(v) for v in bev_pos[b, q])
        r = size_of(bev_window) // 2
        if row >= 0 and size_of(bev_window) > 0:
            h, w = layout.bev_shape
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    y, x = row + dy, col + dx
                    if 0 <= y < h and 0 <= x < w:
                        out.append((y * w + x, 0, dy, dx))
    if cam_pos is not None:
        slots = cam_pos[b, q] if cam_pos.dim() == 4 else cam_pos[b, q].unsqueeze(0)
        r = size_of(cam_window) // 2
        for view, row, col in slots.tolist():
            if view < 0 or size_of(cam_window) == 0:
                continue
            _, hc, wc = layout.cam_shape
            for dy in range(-r, r + 1):
                for dx in range(-r, r + 1):
                    y, x = row + dy, col + dx
                    if 0 <= y < hc and 0 <= x < wc:
                        out.append((layout.num_bev_keys + view * hc * wc + y * wc + x, 1, dy, dx))
    return sorted(out)


def dense_bias(layout, bev_pos, cam_pos, bev_window, cam_window, bev_weight, cam_weight, scale=1.0,
               profile="flat", sigma=None):
    """The dense `sparse_bias.window_bias`, filled entry by entry from `window_entries`: float64 ``[B, Q, K]``
    (weights ``[B, Q]``) or ``[B, H, Q, K]`` (a weight ``[B, Q, H]``), ``weight * scale * f(dy, dx, sigma)`` with
    ``sigma`` a number, a ``(bev, cam)`` pair or None (`default_sigma` of the entry's own window)."""
    batch, queries = bev_weight.shape[:2] if bev_weight is not None else cam_weight.shape[:2]
    heads = None
    for w in (bev_weight, cam_weight):
        if w is not None and w.dim() == 3:
            heads = w.shape[2]
    out = torch.zeros(batch, heads or 1, queries, layout.num_keys, dtype=torch.float64)

    def size_of(window):
        return int(window[b, q]) if isinstance(window, torch.Tensor) else int(window)

    for b in range(batch):
        for q in range(queries):
            for key, source, dy, dx in window_entries(layout, bev_pos, cam_pos, bev_window, cam_window, b, q):
                w = (bev_weight if source == 0 else cam_weight)[b, q].double()
                if sigma is None:
                    s = default_sigma(size_of(bev_window if source == 0 else cam_window))
                else:
                    s = sigma[source] if isinstance(sigma, (tuple, list)) else sigma
                f = float(falloff(profile, *(torch.tensor(float(x), dtype=torch.float64) for x in (dy, dx, s))))
                out[b, :, q, key] = w * float(scale) * f
    return out[:, 0] if heads is None else out


# ---- biases and masks from the index (indptr / key) ------------------------------------------------------------


def entry_rows(win) -> torch.Tensor:
    """The CSR row ``b * Q + q`` of every entry of ``win`` (LongTensor ``[nnz]``), from ``indptr`` alone."""
    counts = win.indptr[1:] - win.indptr[:-1]
    return torch.repeat_interleave(torch.arange(win.num_rows, device=counts.device), counts)


def dense_from_entries(win, values: torch.Tensor) -> torch.Tensor:
    """``[B, 1 | H, Q, K]``: ``values [nnz]`` (shared by the heads) or ``[nnz, H]`` placed at (row, ``key``) of
    each entry, zeros elsewhere; differentiable in ``values``."""
    B, Q, K = win.batch_size, win.num_queries, win.layout.num_keys
    flat = entry_rows(win) * K + win.key
    if values.dim() == 1:
        dense = values.new_zeros(B * Q * K).index_put((flat,), values, accumulate=True)
        return dense.view(B, 1, Q, K)
    dense = values.new_zeros(B * Q * K, values.shape[1]).index_put((flat,), values, accumulate=True)
    return dense.view(B, Q, K, values.shape[1]).permute(0, 3, 1, 2)


def window_mask(win) -> torch.Tensor:
    """bool ``[B, 1, Q, K]``: True at the keys inside a query's windows."""
    B, Q, K = win.batch_size, win.num_queries, win.layout.num_keys
    mask = torch.zeros(B * Q * K, dtype=torch.bool, device=win.key.device)
    mask[entry_rows(win) * K + win.key] = True
    return mask.view(B, 1, Q, K)


def window_values(win, bev_weight, cam_weight, scale=1.0, profile="flat", sigma=None, bev_window=0,
                  cam_window=0) -> torch.Tensor:
    """The values of `sparse_bias.window_bias` recomputed: ``weight(b, q, source) * scale * f(dy, dx, sigma)`` per
    entry, ``[nnz]`` (weights ``[B, Q]``) or ``[nnz, H]`` (``[B, Q, H]``); a weight is None for a modality without
    windows. ``sigma``: a number, a ``(bev, cam)`` pair, or None for `default_sigma` of the entry's window, whose
    size ``bev_window`` / ``cam_window`` gives (an int, or a LongTensor ``[B, Q]`` for adaptive windows)."""
    rows = entry_rows(win)
    src = win.source.long()
    per_head = (bev_weight if bev_weight is not None else cam_weight).dim() == 3

    def pick(w):
        return None if w is None else w.reshape((-1,) + tuple(w.shape[2:]))[rows]
    pb, pc = pick(bev_weight), pick(cam_weight)
    like = pb if pb is not None else pc
    pb = torch.zeros_like(like) if pb is None else pb
    pc = torch.zeros_like(like) if pc is None else pc
    is_bev = (src == 0).view(-1, *([1] * (like.dim() - 1)))
    vals = torch.where(is_bev, pb, pc)
    if sigma is None:
        def half(size):
            if isinstance(size, torch.Tensor):
                return (size.reshape(-1)[rows] // 2).double()
            return torch.full((rows.numel(),), float(size // 2), dtype=torch.float64)
        sig = torch.where(src == 0, half(bev_window), half(cam_window)).clamp(min=1) / 2
    else:
        s_bev, s_cam = sigma if isinstance(sigma, (tuple, list)) else (sigma, sigma)
        sig = torch.where(src == 0, torch.tensor(float(s_bev), dtype=torch.float64),
                          torch.tensor(float(s_cam), dtype=torch.float64))
    f = falloff(profile, win.dy.double(), win.dx.double(), sig).to(vals.dtype)
    return vals * (f.unsqueeze(-1) if per_head else f) * scale


def modality_dense(layout, values: torch.Tensor) -> torch.Tensor:
    """The dense `sparse_bias.ModalityBias`, ``[B, 1 | H, Q, K]``: ``values [B, Q, M]`` or ``[B, Q, M, H]``
    (one value per present modality, BEV first) broadcast over that modality's key range."""
    ranges = [r for r in ((0, layout.num_bev_keys), (layout.num_bev_keys, layout.num_keys)) if r[1] > r[0]]
    vals = values if values.dim() == 3 else values.permute(0, 3, 1, 2)             # [B, (H,) Q, M]
    parts = [vals[..., m:m + 1].expand(*vals.shape[:-1], e - s) for m, (s, e) in enumerate(ranges)]
    dense = torch.cat(parts, -1)
    return dense.unsqueeze(1) if values.dim() == 3 else dense


# ---- attention -------------------------------------------------------------------------------------------------


def scores(q, k, bias=None, key_padding_mask=None, attn_mask=None, window=None, scale=None) -> torch.Tensor:
    """The masked scores ``q k^T * scale + bias + masks``, ``[B, H, Q, K]`` (-inf where blocked).

    ``q [B, H, Q, D]``, ``k [B, H, K, D]``; ``scale`` None = ``1 / sqrt(D)``. ``bias``: ``[B, Q, K]`` (shared by
    the heads) or broadcastable ``[B, H | 1, Q, K]``. ``key_padding_mask [B, K]``: bool / uint8 (True = ignore) or
    float (added). ``attn_mask`` broadcastable to ``[B, H, Q, K]`` (``[Q, K]``, ``[H, Q, K]``, ...): bool (True =
    attend) or float (added). ``window``: bool, broadcastable, True = inside the window."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + (bias.unsqueeze(1) if bias.dim() == 3 else bias).to(s.dtype)
    if key_padding_mask is not None:
        if key_padding_mask.dtype in (torch.bool, torch.uint8):
            s = s.masked_fill(key_padding_mask.bool().view(B, 1, 1, K), -INF)
        else:
            s = s + key_padding_mask.to(s.dtype).view(B, 1, 1, K)
    if attn_mask is not None:
        am = attn_mask
        while am.dim() < 4:
            am = am.unsqueeze(0)
        s = s.masked_fill(~am, -INF) if am.dtype == torch.bool else s + am.to(s.dtype)
    if window is not None:
        s = s.masked_fill(~window, -INF)
    return s


def fully_masked_rows(q, k, bias=None, key_padding_mask=None, attn_mask=None, window=None, scale=None):
    """bool ``[B, H, Q]``: the rows whose every score is -inf (arguments as `scores`); `attention` gives them 0."""
    return ~(scores(q, k, bias, key_padding_mask, attn_mask, window, scale) > -INF).any(-1)


def attention(q, k, v, bias=None, key_padding_mask=None, attn_mask=None, window=None, dropout_p=0.0,
              dropout_seed=0, scale=None) -> torch.Tensor:
    """``softmax(q k^T * scale + bias + masks) v``, ``[B, H, Q, D]`` in the inputs' dtype (masks and bias as in
    `scores`, ``v [B, H, K, D]``). A row whose scores are all -inf gives 0 and zero gradients. ``dropout_p > 0``
    multiplies the probabilities by ``dropout_mask(dropout_seed, [B, H, Q, K], dropout_p) / (1 - dropout_p)``:
    the hash that specifies which entries drop."""
    s = scores(q, k, bias, key_padding_mask, attn_mask, window, scale)
    valid = (s > -INF).any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~valid, 0.0), -1) * valid
    if dropout_p > 0:
        keep = dropout_mask(dropout_seed, tuple(p.shape), dropout_p, q.device)
        p = p * keep.to(p.dtype) / (1 - dropout_p)
    return torch.matmul(p, v)


def _dense(bias) -> Optional[torch.Tensor]:
    """A bias object (`sparse_bias.SparseBias`, `sparse_bias.ModalityBias`) as its ``to_dense()``; a tensor or
    None as is."""
    return bias.to_dense() if isinstance(bias, (sb.SparseBias, sb.ModalityBias)) else bias


def sparse_bias_attention(q, k, v, bias, **kwargs) -> torch.Tensor:
    """`attention` with the arguments of `sparse_bias.sparse_bias_attention`: ``bias`` a ``SparseBias`` or
    ``ModalityBias`` (its ``to_dense()``), a dense ``[B, Q, K]`` / ``[B, H | 1, Q, K]`` tensor, or None;
    ``kwargs`` the masks, ``dropout_p``, ``dropout_seed`` and ``scale`` of `attention`."""
    return attention(q, k, v, _dense(bias), **kwargs)


def window_attention(q, k, v, win, bias=None, **kwargs) -> torch.Tensor:
    """`attention` restricted to the keys of ``win``'s windows (`window_mask`, from the index): the arguments of
    `sparse_bias.window_attention`, ``bias`` a ``SparseBias`` on ``win`` (its ``to_dense()``), a dense tensor or
    None; ``kwargs`` the masks, ``dropout_p``, ``dropout_seed`` and ``scale`` of `attention`."""
    return attention(q, k, v, _dense(bias), window=window_mask(win), **kwargs)

