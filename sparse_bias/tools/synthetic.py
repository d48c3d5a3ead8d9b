"""Synthetic CMT scenes: the model's key layouts, six pinhole cameras around the ego car, random queries.

Used by the demo, the examples, the benchmarks and the tests; no dataset needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..layout import KeyLayout
from ..projection import project_points

__all__ = ["CMT_CONFIGS", "CmtConfig", "SyntheticScene", "synthetic_cameras", "synthetic_scene"]


@dataclass(frozen=True)
class CmtConfig:
    """Shapes of one CMT configuration."""

    bev_shape: Tuple[int, int]
    cam_shape: Tuple[int, int, int]
    img_shape: Tuple[int, int]
    pc_range: Tuple[float, ...] = (-54.0, -54.0, -5.0, 54.0, 54.0, 3.0)

    @property
    def layout(self) -> KeyLayout:
        return KeyLayout(bev_shape=self.bev_shape, cam_shape=self.cam_shape)


#: ``"fusion"``: 1600x640 images, BEV 180x180, cameras 6x40x100 (56400 keys).
#: ``"small"``: 800x320 images, BEV 128x128, cameras 6x20x50 (22384 keys).
CMT_CONFIGS = {
    "fusion": CmtConfig(bev_shape=(180, 180), cam_shape=(6, 40, 100), img_shape=(640, 1600)),
    "small": CmtConfig(bev_shape=(128, 128), cam_shape=(6, 20, 50), img_shape=(320, 800)),
}

# nuScenes-like rig: front, front-right, back-right, back, back-left, front-left (yaw from lidar +x).
_CAMERA_YAWS_DEG = (0.0, -55.0, -110.0, 180.0, 110.0, 55.0)


def synthetic_cameras(batch_size: int = 1, img_shape: Tuple[int, int] = (640, 1600), num_views: int = 6,
                      fov_deg: float = 70.0, height: float = 1.6, dtype=torch.float32) -> torch.Tensor:
    """``lidar2img`` matrices ``[B, V, 4, 4]`` of ``V`` pinhole cameras on a ring around the ego car.

    Lidar frame: x forward, y left, z up. Camera ``v`` sits ``height`` metres up, looks horizontally at
    yaw ``_CAMERA_YAWS_DEG[v]`` (evenly spaced when ``V != 6``), with a horizontal field of view of
    ``fov_deg`` over the image width: neighbouring 70-degree views overlap, so some points are seen twice.
    """
    img_h, img_w = img_shape
    focal = (img_w / 2) / math.tan(math.radians(fov_deg) / 2)
    intr = torch.tensor([[focal, 0.0, img_w / 2, 0.0], [0.0, focal, img_h / 2, 0.0],
                         [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64)
    yaws = _CAMERA_YAWS_DEG if num_views == 6 else tuple(360.0 * v / num_views for v in range(num_views))
    mats = []
    for yaw in yaws:
        c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
        # rows: camera x (right), y (down), z (forward) expressed in the lidar frame
        rot = torch.tensor([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]], dtype=torch.float64)
        ext = torch.eye(4, dtype=torch.float64)
        ext[:3, :3] = rot
        ext[:3, 3] = -rot @ torch.tensor([0.0, 0.0, height], dtype=torch.float64)
        mats.append(intr @ ext)
    return torch.stack(mats).to(dtype).unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()


@dataclass
class SyntheticScene:
    """A synthetic CMT scene: reference points, cameras and their projected cells."""

    config: CmtConfig
    layout: KeyLayout
    ref_points: torch.Tensor        # [B, Q, 3], normalised over pc_range
    lidar2img: torch.Tensor         # [B, V, 4, 4]
    bev_pos: torch.Tensor           # [B, Q, 2]
    cam_pos: torch.Tensor           # [B, Q, M, 3]


def synthetic_scene(batch_size: int = 2, num_queries: int = 900, config: str = "fusion", max_views: int = 2,
                    seed: int = 0, device: Optional[torch.device] = None) -> SyntheticScene:
    """Random reference points (uniform over the BEV range, near the ground) in a CMT configuration,
    projected onto the BEV grid and the six synthetic cameras of `synthetic_cameras`."""
    if config not in CMT_CONFIGS:
        raise ValueError(f"config must be one of {sorted(CMT_CONFIGS)}, got {config!r}")
    cfg = CMT_CONFIGS[config]
    gen = torch.Generator().manual_seed(seed)
    ref = torch.rand(batch_size, num_queries, 3, generator=gen)
    ref[..., 2] = 0.3 + 0.3 * ref[..., 2]          # z in [-2.6, -0.2] m: objects on the road
    lidar2img = synthetic_cameras(batch_size, cfg.img_shape, num_views=cfg.cam_shape[0])
    if device is not None:
        ref, lidar2img = ref.to(device), lidar2img.to(device)
    bev_pos, cam_pos = project_points(ref, cfg.pc_range, cfg.layout, lidar2img, cfg.img_shape, max_views)
    return SyntheticScene(cfg, cfg.layout, ref, lidar2img, bev_pos, cam_pos)
