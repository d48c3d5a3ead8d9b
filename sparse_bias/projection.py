"""Project normalised 3D reference points to BEV cells and camera feature cells."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ._core.checks import check_device, check_tensor
from ._core.compat import not_traced
from .layout import KeyLayout

__all__ = ["project_points"]

#: A point is in front of a camera when its depth exceeds this (the CMT / PETR convention).
MIN_DEPTH = 1e-5

#: Normalised reference points may leave ``[0, 1]`` by up to this much on any axis (propagated, denoised or
#: noisy queries just outside ``pc_range``); a value further out is refused as not normalised.
RANGE_MARGIN = 0.5

#: An ``img_shape`` reading fits the layout when its pixels per camera feature cell along the height and the
#: width agree within this factor (a backbone has one stride on both axes).
STRIDE_TOLERANCE = 1.25


def _check_pc_range(pc_range) -> Tuple[float, ...]:
    pc = torch.as_tensor(pc_range, dtype=torch.float64).flatten().tolist()
    if len(pc) != 6:
        raise ValueError(f"pc_range must be [x_min, y_min, z_min, x_max, y_max, z_max], got {pc_range!r}")
    if not all(hi > lo for lo, hi in zip(pc[:3], pc[3:])):
        raise ValueError(f"pc_range must have max > min on every axis, got {pc}")
    return tuple(pc)


def _check_img_shape(img_shape, cam_shape) -> Tuple[float, float]:
    """``(img_h, img_w)`` as floats; refuses a (width, height) pair that only fits the layout read the other way."""
    if img_shape is None or len(img_shape) != 2 or any(float(s) <= 0 for s in img_shape):
        raise ValueError(f"img_shape must be the padded image (height, width) with lidar2img, got {img_shape!r}")
    img_h, img_w = (float(s) for s in img_shape)
    _, hc, wc = cam_shape

    def misfit(h, w):                    # how far the two strides of a reading are apart, as a factor >= 1
        return math.exp(abs(math.log((h / hc) / (w / wc))))
    if misfit(img_h, img_w) > STRIDE_TOLERANCE >= misfit(img_w, img_h):
        raise ValueError(
            f"img_shape must be the padded image (height, width), got {tuple(img_shape)!r}: read as height "
            f"{img_h:g}, width {img_w:g} it gives {img_h / hc:.4g} x {img_w / wc:.4g} pixels per cell of the "
            f"layout's camera feature maps (Hc, Wc) = ({hc}, {wc}); read as (width, height) -- height {img_w:g}, "
            f"width {img_h:g} -- it gives {img_w / hc:.4g} x {img_h / wc:.4g}, the one stride of a backbone. Pass "
            f"img_shape={tuple(reversed(tuple(img_shape)))!r} (or fix cam_shape, if it is the one given as "
            f"(V, Wc, Hc))")
    return img_h, img_w


def _principal_points(lidar2img: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cx, cy, valid)``, each ``[B, V]``: the principal point in pixels of ``lidar2img = K @ [R | t]``.

    With ``M = K R`` (the top-left 3 x 3 block) and ``m_i`` its rows, ``M M^T = K K^T`` gives
    ``cx = m_1 . m_3 / |m_3|^2`` and ``cy = m_2 . m_3 / |m_3|^2`` for any pinhole ``K`` (skew included);
    ``valid`` is False where ``m_3 = 0`` (no camera)."""
    m = lidar2img[..., :3, :3]
    norm = (m[..., 2, :] * m[..., 2, :]).sum(-1)
    valid = norm > 0
    safe = torch.where(valid, norm, torch.ones_like(norm))
    return (m[..., 0, :] * m[..., 2, :]).sum(-1) / safe, (m[..., 1, :] * m[..., 2, :]).sum(-1) / safe, valid


def _swapped_by_principal_point(cx, cy, valid, img_h: float, img_w: float) -> torch.Tensor:
    """0-d bool tensor: every camera's principal point lies outside the (img_h, img_w) image and inside the
    (img_w, img_h) one (real cameras keep it inside the padded image, crops and flips included)."""
    outside = (cx < 0) | (cx > img_w) | (cy < 0) | (cy > img_h)
    inside_swapped = (cx >= 0) & (cx <= img_h) & (cy >= 0) & (cy <= img_w)
    return valid.any() & (~valid | (outside & inside_swapped)).all()


@not_traced("sparse_bias: project_points checks its inputs' values and builds the cells a window index is made "
            "from, so it runs outside torch.compile's graph; with fullgraph=True (or torch.export) project the "
            "points before the compiled region and pass the cells or the index in")
def project_points(ref_points: torch.Tensor, pc_range: Sequence[float], layout: KeyLayout,
                   lidar2img: Optional[torch.Tensor] = None, img_shape: Optional[Sequence[int]] = None,
                   max_views: int = 2) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Cells of the BEV grid and of the camera feature maps that each reference point falls in.

    BEV: the point ``ref * (max - min) + min`` lands in column ``floor(ref_x * W)`` and row
    ``floor(ref_y * H)`` (row follows lidar y, column lidar x). A point exactly on the upper boundary
    belongs to the last cell. A point outside ``[0, 1]`` in x or y is outside the BEV grid and gets no BEV
    window, ``(-1, -1)``; z does not select a BEV cell.

    Cameras: the metric point is projected with ``lidar2img``; it is visible in a view when its depth is
    ``> 1e-5`` and its pixel ``(u, v)`` satisfies ``0 <= u < img_w``, ``0 <= v < img_h`` (the padded
    image). Its feature cell is ``(floor(v * Hc / img_h), floor(u * Wc / img_w))``. The first
    ``max_views`` views (in view order) that see the point are returned; the rest of the slots are
    ``(-1, -1, -1)``. A point outside ``pc_range`` is projected like any other (cameras see beyond it).
    Computed in float64.

    Reference points are normalised over ``pc_range`` (as CMT's sigmoid reference points are). Values in
    ``[-0.5, 1.5]`` are accepted: propagated, denoised or noisy queries leave ``[0, 1]`` a little. A value
    outside ``[-0.5, 1.5]`` on any axis is a `ValueError` for the whole call, as metric coordinates passed by
    mistake would otherwise silently give no BEV windows. The value checks read the device once per call (one
    host synchronisation on a GPU, the index building's); the attention calls never run them.

    Args:
        ref_points: ``[B, Q, 3]`` reference points normalised over ``pc_range``, within ``[-0.5, 1.5]``.
        pc_range: ``[x_min, y_min, z_min, x_max, y_max, z_max]`` in metres.
        layout: the `KeyLayout` (its BEV and camera shapes).
        lidar2img: ``[B, V, 4, 4]`` lidar-to-image matrices (intrinsics @ extrinsics), or None.
        img_shape: padded image size ``(height, width)`` in pixels; required with ``lidar2img``. A
            ``(width, height)`` pair is refused when the layout's camera feature maps or ``lidar2img``'s
            principal points show it (see Raises).
        max_views: slots ``M`` per query in ``cam_pos`` (2 covers the overlap of neighbouring cameras).

    Returns:
        ``(bev_pos, cam_pos)``: LongTensor ``[B, Q, 2]`` (None when the layout has no BEV part) and
        LongTensor ``[B, Q, M, 3]`` of ``(view, row, col)`` (None without ``lidar2img`` or cameras).

    Raises:
        ValueError: ``ref_points`` outside ``[-0.5, 1.5]`` (e.g. metric coordinates) or not finite; bad shapes or
            ``pc_range``; ``img_shape`` given as ``(width, height)``: its reading as ``(height, width)`` gives
            pixels per feature cell that differ by more than 1.25x between the axes while the swapped reading
            agrees, or every camera's principal point lies outside the ``(height, width)`` image and inside the
            swapped one.

    Example:
        >>> import torch, sparse_bias as sb
        >>> layout = sb.KeyLayout(bev_shape=(180, 180))
        >>> ref = torch.tensor([[[0.5, 0.25, 0.5], [1.0, 0.5, 0.5], [1.05, 0.5, 0.5]]])
        >>> bev_pos, _ = sb.project_points(ref, [-54, -54, -5, 54, 54, 3], layout)
        >>> bev_pos.tolist()
        [[[45, 90], [90, 179], [-1, -1]]]
    """
    check_tensor("ref_points", ref_points, ndim=(3,), floating=True)
    if ref_points.shape[-1] != 3:
        raise ValueError(f"ref_points must be [B, Q, 3], got shape {tuple(ref_points.shape)}")
    if not isinstance(layout, KeyLayout):
        raise TypeError(f"layout must be a KeyLayout, got {type(layout).__name__}")
    if isinstance(max_views, bool) or not isinstance(max_views, int) or max_views < 1:
        raise ValueError(f"max_views must be a positive int, got {max_views!r}")
    pc = _check_pc_range(pc_range)
    ref = ref_points.detach().to(torch.float64)
    batch, queries = ref.shape[:2]
    if lidar2img is not None:
        if layout.cam_shape is None:
            raise ValueError("lidar2img was given but the layout has no camera part (cam_shape=None)")
        check_tensor("lidar2img", lidar2img, ndim=(4,), floating=True)
        views, hc, wc = layout.cam_shape
        if tuple(lidar2img.shape) != (batch, views, 4, 4):
            raise ValueError(f"lidar2img must be [B, V, 4, 4] = [{batch}, {views}, 4, 4], "
                             f"got shape {tuple(lidar2img.shape)}")
        check_device("lidar2img", lidar2img, ref_points.device, "ref_points")
        img_h, img_w = _check_img_shape(img_shape, layout.cam_shape)
        l2i = lidar2img.detach().to(torch.float64)
        principal = _principal_points(l2i)

    # Every check of device values in one read (one host synchronisation on a GPU).
    far = (ref < -RANGE_MARGIN) | (ref > 1 + RANGE_MARGIN)
    flags = [~torch.isfinite(ref).all(), far.any()]
    if lidar2img is not None:
        flags += [~torch.isfinite(l2i).all(), _swapped_by_principal_point(*principal, img_h, img_w)]
    flags = torch.stack(flags).tolist()
    if flags[0]:
        raise ValueError(f"ref_points contains {'NaN' if bool(torch.isnan(ref).any()) else 'infinite'} values")
    if flags[1]:
        b, q, axis = (int(i) for i in far.nonzero()[0])
        raise ValueError(
            f"ref_points must be normalised over pc_range, i.e. (xyz - pc_range[:3]) / (pc_range[3:] - "
            f"pc_range[:3]) (CMT's sigmoid reference points are), within [{-RANGE_MARGIN:g}, "
            f"{1 + RANGE_MARGIN:g}] (points just outside [0, 1] get no BEV window); got ref_points[{b}, {q}, "
            f"{axis}] = {float(ref[b, q, axis]):.4g}, values in [{float(ref.min()):.4g}, {float(ref.max()):.4g}] "
            f"-- metric coordinates?")
    if lidar2img is not None and flags[2]:
        raise ValueError(f"lidar2img contains {'NaN' if bool(torch.isnan(l2i).any()) else 'infinite'} values")
    if lidar2img is not None and flags[3]:
        cx, cy, valid = principal
        b, v = (int(i) for i in valid.nonzero()[0])
        raise ValueError(
            f"img_shape must be the padded image (height, width), got {tuple(img_shape)!r}: lidar2img's principal "
            f"point (cx, cy) = ({float(cx[b, v]):.1f}, {float(cy[b, v]):.1f}) px (lidar2img[{b}, {v}]) lies, in "
            f"every view, outside an image read as height {img_h:g}, width {img_w:g} and inside one read as "
            f"(width, height) -- height {img_w:g}, width {img_h:g}. Pass "
            f"img_shape={tuple(reversed(tuple(img_shape)))!r} (and cam_shape as (V, Hc, Wc))")

    bev_pos = None
    if layout.bev_shape is not None:
        h, w = layout.bev_shape
        inside = ((ref[..., :2] >= 0) & (ref[..., :2] <= 1)).all(dim=-1)          # x and y on the grid
        col = torch.floor(ref[..., 0] * w).long().clamp(0, w - 1)
        row = torch.floor(ref[..., 1] * h).long().clamp(0, h - 1)
        bev_pos = torch.stack([row, col], dim=-1).masked_fill(~inside.unsqueeze(-1), -1)

    cam_pos = None
    if lidar2img is not None:
        lo = torch.tensor(pc[:3], dtype=torch.float64, device=ref.device)
        hi = torch.tensor(pc[3:], dtype=torch.float64, device=ref.device)
        pts = ref * (hi - lo) + lo                                                  # [B, Q, 3] metres
        pts = torch.cat([pts, torch.ones_like(pts[..., :1])], dim=-1)               # [B, Q, 4]
        cam = torch.einsum("bvij,bqj->bqvi", l2i, pts)                              # [B, Q, V, 4]
        depth = cam[..., 2]
        in_front = depth > MIN_DEPTH
        safe = torch.where(in_front, depth, torch.ones_like(depth))
        u, v = cam[..., 0] / safe, cam[..., 1] / safe
        visible = in_front & (u >= 0) & (u < img_w) & (v >= 0) & (v < img_h)        # [B, Q, V]
        cell_r = torch.floor(v.clamp(0, img_h) * hc / img_h).long().clamp(0, hc - 1)
        cell_c = torch.floor(u.clamp(0, img_w) * wc / img_w).long().clamp(0, wc - 1)

        # The first max_views visible views, in view order: a stable sort puts visible views first.
        order = torch.sort((~visible).to(torch.int8), dim=-1, stable=True).indices[..., :max_views]
        slot_visible = visible.gather(-1, order)
        slots = torch.stack([order, cell_r.gather(-1, order), cell_c.gather(-1, order)], dim=-1)
        cam_pos = slots.masked_fill(~slot_visible.unsqueeze(-1), -1)
        if cam_pos.shape[2] < max_views:                                            # fewer views than slots
            pad = cam_pos.new_full((batch, queries, max_views - cam_pos.shape[2], 3), -1)
            cam_pos = torch.cat([cam_pos, pad], dim=2)
    return bev_pos, cam_pos
