"""The window bias as a FlexAttention ``score_mod`` (for comparisons with ``torch.nn.attention.flex_attention``).

FlexAttention evaluates a ``score_mod(score, b, h, q_idx, kv_idx)`` per score inside a fused kernel; the
window bias of `sparse_bias.window_bias` can be computed there from the window centres, with no ``[B, Q, K]``
tensor. Every profile of `sparse_bias.profiles.PROFILES` is supported, through the same functions as
`window_bias`. The benchmarks and `sparse_bias.tools.selftest` time it against this library.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .layout import KeyLayout
from .profiles import get_profile, sigma_pair

__all__ = ["flex_score_mod"]


def flex_score_mod(layout: KeyLayout, bev_pos: torch.Tensor, cam_pos: torch.Tensor, bev_window: int, cam_window: int,
                   bev_weight: torch.Tensor, cam_weight: torch.Tensor, profile: str = "flat",
                   sigma: Union[None, float, Sequence[float]] = None):
    """A ``score_mod`` adding ``bev_weight[b, q] * f(dy, dx)`` on the BEV window and ``cam_weight[b, q] * f(dy, dx)``
    on each camera window, ``(dy, dx)`` the key's offset from the window centre and ``f`` the profile.

    Args:
        layout: the `sparse_bias.KeyLayout` (BEV grid and camera views both present).
        bev_pos: LongTensor ``[B, Q, 2]`` of BEV window centres (row < 0 = none).
        cam_pos: LongTensor ``[B, Q, M, 3]`` of camera window centres ``(view, row, col)`` (view < 0 = none).
        bev_window: odd BEV window size.
        cam_window: odd camera window size.
        bev_weight: ``[B, Q]`` weight on the BEV window.
        cam_weight: ``[B, Q]`` weight on the camera windows.
        profile: a name in `sparse_bias.profiles.PROFILES` (``"flat"``, ``"gaussian"``); another name is
            refused with a ValueError naming the choices.
        sigma: the profile's width in cells, as in `sparse_bias.window_bias`: a float, a ``(bev, cam)`` pair, or
            None for half the window's half-size (``max(w // 2, 1) / 2``).

    Returns:
        ``score_mod`` for ``flex_attention(q, k, v, score_mod=...)``; the result equals
        ``dense_bias_attention(q, k, v, window_bias(win, bev_weight, cam_weight, profile=profile,
        sigma=sigma).to_dense())`` for the windows ``local_windows(layout, bev_pos, cam_pos, bev_window, cam_window)``.
    """
    falloff_of = get_profile(profile)
    if layout.bev_shape is None or layout.cam_shape is None:
        raise ValueError(f"layout must have a BEV grid and camera views, got {layout!r}")
    pair = sigma_pair(sigma)
    if pair is None:                                      # as window_bias: max(size // 2, 1) / 2 per modality
        pair = (max(bev_window // 2, 1) / 2, max(cam_window // 2, 1) / 2)
    # As window_bias: the falloff in the weights' dtype promoted to at least fp32, on their device.
    fdtype = torch.promote_types(torch.promote_types(bev_weight.dtype, cam_weight.dtype), torch.float32)
    sig_bev, sig_cam = (torch.tensor(float(s), dtype=fdtype, device=bev_weight.device) for s in pair)
    _, wb = layout.bev_shape
    _, hc, wc = layout.cam_shape
    rb, rc = bev_window // 2, cam_window // 2
    per_view, nb = hc * wc, layout.num_bev_keys

    def falloff(dy, dx, sig):
        return falloff_of(dy.to(fdtype), dx.to(fdtype), sig)

    def score_mod(score, b, h, q_idx, kv_idx):
        is_cam = kv_idx >= nb
        local = torch.where(is_cam, kv_idx - nb, kv_idx)
        view = torch.where(is_cam, local // per_view, -1)
        in_view = local % per_view
        row = torch.where(is_cam, in_view // wc, local // wb)
        col = torch.where(is_cam, in_view % wc, local % wb)
        br, bc = bev_pos[b, q_idx, 0], bev_pos[b, q_idx, 1]
        in_bev = (~is_cam) & (br >= 0) & ((row - br).abs() <= rb) & ((col - bc).abs() <= rb)
        bias = torch.where(in_bev, bev_weight[b, q_idx] * falloff(row - br, col - bc, sig_bev), 0.0)
        for m in range(cam_pos.shape[2]):
            cv, cr, cc = cam_pos[b, q_idx, m, 0], cam_pos[b, q_idx, m, 1], cam_pos[b, q_idx, m, 2]
            hit = is_cam & (view == cv) & ((row - cr).abs() <= rc) & ((col - cc).abs() <= rc)
            bias = bias + torch.where(hit, cam_weight[b, q_idx] * falloff(row - cr, col - cc, sig_cam), 0.0)
        return score + bias

    return score_mod
