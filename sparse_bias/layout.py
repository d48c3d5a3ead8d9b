"""Key layout of a CMT-style multi-modal memory: a BEV grid followed by camera feature maps."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._core.checks import check_shape_2d

__all__ = ["KeyLayout"]


@dataclass(frozen=True)
class KeyLayout:
    """Where every key of the attention memory sits on the BEV grid or on a camera view.

    Keys are ordered BEV row-major first (``h * W + w``), then cameras view by view, each row-major
    (``num_bev_keys + v * Hc * Wc + h * Wc + w``) -- the order in which CMT concatenates its memory.

    Args:
        bev_shape: ``(H, W)`` of the BEV feature map, or None for a camera-only model.
        cam_shape: ``(V, Hc, Wc)`` -- views and feature-map size per view, or None for a LiDAR-only model.

    Example:

        >>> import torch, sparse_bias as sb
        >>> layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100))
        >>> layout.num_keys
        56400
        >>> layout.cam_key(0, 0, 0)
        32400
    """

    bev_shape: Optional[Tuple[int, int]] = None
    cam_shape: Optional[Tuple[int, int, int]] = None

    def __post_init__(self):
        object.__setattr__(self, "bev_shape", check_shape_2d("bev_shape", self.bev_shape, 2))
        object.__setattr__(self, "cam_shape", check_shape_2d("cam_shape", self.cam_shape, 3))
        if self.bev_shape is None and self.cam_shape is None:
            raise ValueError("KeyLayout needs at least one of bev_shape or cam_shape, got both None")

    @property
    def num_bev_keys(self) -> int:
        """``H * W`` (0 without a BEV part)."""
        return 0 if self.bev_shape is None else self.bev_shape[0] * self.bev_shape[1]

    @property
    def num_views(self) -> int:
        return 0 if self.cam_shape is None else self.cam_shape[0]

    @property
    def keys_per_view(self) -> int:
        return 0 if self.cam_shape is None else self.cam_shape[1] * self.cam_shape[2]

    @property
    def num_cam_keys(self) -> int:
        """``V * Hc * Wc`` (0 without cameras)."""
        return self.num_views * self.keys_per_view

    @property
    def cam_offset(self) -> int:
        """Index of the first camera key (= ``num_bev_keys``)."""
        return self.num_bev_keys

    @property
    def num_keys(self) -> int:
        """Total number of keys ``K``."""
        return self.num_bev_keys + self.num_cam_keys

    def bev_key(self, row, col):
        """Key index of BEV cell ``(row, col)``; ints or tensors of any (broadcastable) shape."""
        if self.bev_shape is None:
            raise ValueError("bev_key: this layout has no BEV part (bev_shape=None)")
        return row * self.bev_shape[1] + col

    def cam_key(self, view, row, col):
        """Key index of camera cell ``(view, row, col)``; ints or tensors of any (broadcastable) shape."""
        if self.cam_shape is None:
            raise ValueError("cam_key: this layout has no camera part (cam_shape=None)")
        _, hc, wc = self.cam_shape
        return self.num_bev_keys + view * (hc * wc) + row * wc + col

    def decode(self, key: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inverse of `bev_key` / `cam_key`.

        Args:
            key: LongTensor of any shape with values in ``[0, num_keys)``.

        Returns:
            ``(source, view, row, col)``, each shaped like ``key``: source 0 = BEV, 1 = camera;
            view is -1 for BEV keys.
        """
        key = torch.as_tensor(key)
        is_cam = key >= self.num_bev_keys
        local_bev = key.clamp(max=max(self.num_bev_keys - 1, 0))
        bev_w = self.bev_shape[1] if self.bev_shape is not None else 1
        local_cam = (key - self.num_bev_keys).clamp(min=0)
        cam_w = self.cam_shape[2] if self.cam_shape is not None else 1
        per_view = max(self.keys_per_view, 1)
        view = torch.where(is_cam, local_cam // per_view, torch.full_like(key, -1))
        in_view = local_cam % per_view
        row = torch.where(is_cam, in_view // cam_w, local_bev // bev_w)
        col = torch.where(is_cam, in_view % cam_w, local_bev % bev_w)
        return is_cam.long(), view, row, col

    def __repr__(self) -> str:
        return f"KeyLayout(bev_shape={self.bev_shape}, cam_shape={self.cam_shape}, num_keys={self.num_keys})"
