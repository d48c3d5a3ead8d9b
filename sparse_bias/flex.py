"""The flat window bias as a FlexAttention ``score_mod`` (for comparisons with ``torch.nn.attention.flex_attention``).

FlexAttention evaluates a ``score_mod(score, b, h, q_idx, kv_idx)`` per score inside a fused kernel; the
window bias of `sparse_bias.window_bias` (flat profile) can be computed there from the window centres,
with no ``[B, Q, K]`` tensor. The benchmarks and `sparse_bias.selftest` time it against this library.
"""
from __future__ import annotations

import torch

from .layout import KeyLayout

__all__ = ["flex_score_mod"]


def flex_score_mod(layout: KeyLayout, bev_pos: torch.Tensor, cam_pos: torch.Tensor, bev_window: int, cam_window: int,
                   bev_weight: torch.Tensor, cam_weight: torch.Tensor):
    """A ``score_mod`` adding ``bev_weight[b, q]`` on the BEV window and ``cam_weight[b, q]`` on each camera window.

    Args:
        layout: the `sparse_bias.KeyLayout` (BEV grid and camera views both present).
        bev_pos: LongTensor ``[B, Q, 2]`` of BEV window centres (row < 0 = none).
        cam_pos: LongTensor ``[B, Q, M, 3]`` of camera window centres ``(view, row, col)`` (view < 0 = none).
        bev_window: odd BEV window size.
        cam_window: odd camera window size.
        bev_weight: ``[B, Q]`` weight on the BEV window.
        cam_weight: ``[B, Q]`` weight on the camera windows.

    Returns:
        ``score_mod`` for ``flex_attention(q, k, v, score_mod=...)``; the result equals
        ``dense_bias_attention(q, k, v, window_bias(win, bev_weight, cam_weight).to_dense())`` for the windows
        ``local_windows(layout, bev_pos, cam_pos, bev_window, cam_window)``.
    """
    if layout.bev_shape is None or layout.cam_shape is None:
        raise ValueError(f"layout must have a BEV grid and camera views, got {layout!r}")
    _, wb = layout.bev_shape
    _, hc, wc = layout.cam_shape
    rb, rc = bev_window // 2, cam_window // 2
    per_view, nb = hc * wc, layout.num_bev_keys

    def score_mod(score, b, h, q_idx, kv_idx):
        is_cam = kv_idx >= nb
        local = torch.where(is_cam, kv_idx - nb, kv_idx)
        view = torch.where(is_cam, local // per_view, -1)
        in_view = local % per_view
        row = torch.where(is_cam, in_view // wc, local // wb)
        col = torch.where(is_cam, in_view % wc, local % wb)
        br, bc = bev_pos[b, q_idx, 0], bev_pos[b, q_idx, 1]
        in_bev = (~is_cam) & (br >= 0) & ((row - br).abs() <= rb) & ((col - bc).abs() <= rb)
        bias = torch.where(in_bev, bev_weight[b, q_idx], 0.0)
        for m in range(cam_pos.shape[2]):
            cv, cr, cc = cam_pos[b, q_idx, m, 0], cam_pos[b, q_idx, m, 1], cam_pos[b, q_idx, m, 2]
            hit = is_cam & (view == cv) & ((row - cr).abs() <= rc) & ((col - cc).abs() <= rc)
            bias = bias + torch.where(hit, cam_weight[b, q_idx], 0.0)
        return score + bias

    return score_mod
