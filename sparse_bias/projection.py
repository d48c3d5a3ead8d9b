"""Project normalised 3D reference points to BEV cells and camera feature cells."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ._checks import check_device, check_finite, check_tensor
from .layout import KeyLayout

__all__ = ["project_points"]

#: A point is in front of a camera when its depth exceeds this (the CMT / PETR convention).
MIN_DEPTH = 1e-5


def _check_pc_range(pc_range) -> Tuple[float, ...]:
    pc = torch.as_tensor(pc_range, dtype=torch.float64).flatten()
    if pc.numel() != 6:
        raise ValueError(f"pc_range must be [x_min, y_min, z_min, x_max, y_max, z_max], got {pc_range!r}")
    if not bool((pc[3:] > pc[:3]).all()):
        raise ValueError(f"pc_range must have max > min on every axis, got {pc.tolist()}")
    return tuple(pc.tolist())


def project_points(ref_points: torch.Tensor, pc_range: Sequence[float], layout: KeyLayout,
                   lidar2img: Optional[torch.Tensor] = None, img_shape: Optional[Sequence[int]] = None,
                   max_views: int = 2) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Cells of the BEV grid and of the camera feature maps that each reference point falls in.

    BEV: the point ``ref * (max - min) + min`` lands in column ``floor(ref_x * W)`` and row
    ``floor(ref_y * H)`` (row follows lidar y, column lidar x). A point exactly on the upper boundary
    belongs to the last cell. Reference points must be normalised to ``[0, 1]`` over ``pc_range`` (as CMT's
    sigmoid reference points are): a value outside is an error, since metric coordinates passed by mistake
    would otherwise silently give no windows.

    Cameras: the metric point is projected with ``lidar2img``; it is visible in a view when its depth is
    ``> 1e-5`` and its pixel ``(u, v)`` satisfies ``0 <= u < img_w``, ``0 <= v < img_h`` (the padded
    image). Its feature cell is ``(floor(v * Hc / img_h), floor(u * Wc / img_w))``. The first
    ``max_views`` views (in view order) that see the point are returned; the rest of the slots are
    ``(-1, -1, -1)``. Computed in float64.

    Args:
        ref_points: ``[B, Q, 3]`` reference points normalised to ``[0, 1]`` over ``pc_range``.
        pc_range: ``[x_min, y_min, z_min, x_max, y_max, z_max]`` in metres.
        layout: the `KeyLayout` (its BEV and camera shapes).
        lidar2img: ``[B, V, 4, 4]`` lidar-to-image matrices (intrinsics @ extrinsics), or None.
        img_shape: padded image size ``(height, width)`` in pixels; required with ``lidar2img``.
        max_views: slots ``M`` per query in ``cam_pos`` (2 covers the overlap of neighbouring cameras).

    Returns:
        ``(bev_pos, cam_pos)``: LongTensor ``[B, Q, 2]`` (None when the layout has no BEV part) and
        LongTensor ``[B, Q, M, 3]`` of ``(view, row, col)`` (None without ``lidar2img`` or cameras).

    Raises:
        ValueError: ``ref_points`` outside ``[0, 1]`` (e.g. metric coordinates), bad shapes or ``pc_range``.

    Example:
        >>> import torch, sparse_bias as sb
        >>> layout = sb.KeyLayout(bev_shape=(180, 180))
        >>> ref = torch.tensor([[[0.5, 0.25, 0.5], [1.0, 0.5, 0.5]]])
        >>> bev_pos, _ = sb.project_points(ref, [-54, -54, -5, 54, 54, 3], layout)
        >>> bev_pos.tolist()
        [[[45, 90], [90, 179]]]
    """
    check_tensor("ref_points", ref_points, ndim=(3,), floating=True)
    if ref_points.shape[-1] != 3:
        raise ValueError(f"ref_points must be [B, Q, 3], got shape {tuple(ref_points.shape)}")
    check_finite("ref_points", ref_points)
    if ref_points.numel() and bool(((ref_points < 0) | (ref_points > 1)).any()):
        raise ValueError(f"ref_points must be normalised to [0, 1] over pc_range, i.e. (xyz - pc_range[:3]) / "
                         f"(pc_range[3:] - pc_range[:3]) (CMT's sigmoid reference points are), got values in "
                         f"[{float(ref_points.min()):.4g}, {float(ref_points.max()):.4g}] -- metric coordinates?")
    if not isinstance(layout, KeyLayout):
        raise TypeError(f"layout must be a KeyLayout, got {type(layout).__name__}")
    if isinstance(max_views, bool) or not isinstance(max_views, int) or max_views < 1:
        raise ValueError(f"max_views must be a positive int, got {max_views!r}")
    lo = torch.tensor(_check_pc_range(pc_range)[:3], dtype=torch.float64, device=ref_points.device)
    hi = torch.tensor(_check_pc_range(pc_range)[3:], dtype=torch.float64, device=ref_points.device)
    ref = ref_points.detach().to(torch.float64)
    batch, queries = ref.shape[:2]

    bev_pos = None
    if layout.bev_shape is not None:
        h, w = layout.bev_shape
        inside = ((ref >= 0) & (ref <= 1)).all(dim=-1)
        col = torch.floor(ref[..., 0] * w).long().clamp(max=w - 1)
        row = torch.floor(ref[..., 1] * h).long().clamp(max=h - 1)
        bev_pos = torch.stack([row, col], dim=-1).masked_fill(~inside.unsqueeze(-1), -1)

    cam_pos = None
    if lidar2img is not None:
        if layout.cam_shape is None:
            raise ValueError("lidar2img was given but the layout has no camera part (cam_shape=None)")
        check_tensor("lidar2img", lidar2img, ndim=(4,), floating=True)
        views, hc, wc = layout.cam_shape
        if tuple(lidar2img.shape) != (batch, views, 4, 4):
            raise ValueError(f"lidar2img must be [B, V, 4, 4] = [{batch}, {views}, 4, 4], "
                             f"got shape {tuple(lidar2img.shape)}")
        check_device("lidar2img", lidar2img, ref_points.device, "ref_points")
        check_finite("lidar2img", lidar2img)
        if img_shape is None or len(img_shape) != 2 or any(float(s) <= 0 for s in img_shape):
            raise ValueError(f"img_shape must be the padded image (height, width) with lidar2img, "
                             f"got {img_shape!r}")
        img_h, img_w = (float(s) for s in img_shape)

        pts = ref * (hi - lo) + lo                                                  # [B, Q, 3] metres
        pts = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1)               # [B, Q, 4]
        cam = torch.einsum("bvij,bqj->bqvi", lidar2img.detach().to(torch.float64), pts)  # [B, Q, V, 4]
        depth = cam[..., 2]
        in_front = depth > MIN_DEPTH
        safe = torch.where(in_front, depth, torch.ones_like(depth))
        u, v = cam[..., 0] / safe, cam[..., 1] / safe
        visible = in_front & (u >= 0) & (u < img_w) & (v >= 0) & (v < img_h)        # [B, Q, V]
        cell_r = torch.floor(v * hc / img_h).long().clamp(0, hc - 1)
        cell_c = torch.floor(u * wc / img_w).long().clamp(0, wc - 1)

        # The first max_views visible views, in view order: a stable sort puts visible views first.
        order = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices[..., :max_views]
        slot_visible = visible.gather(-1, order)
        slots = torch.stack([order, cell_r.gather(-1, order), cell_c.gather(-1, order)], dim=-1)
        cam_pos = slots.masked_fill(~slot_visible.unsqueeze(-1), -1)
        if cam_pos.shape[2] < max_views:                                            # fewer views than slots
            pad = cam_pos.new_full((batch, queries, max_views - cam_pos.shape[2], 3), -1)
            cam_pos = torch.cat([cam_pos, pad], dim=2)
    return bev_pos, cam_pos
