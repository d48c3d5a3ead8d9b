"""project_points against hand-computed pinhole cameras."""
import math

import pytest
import torch

import sparse_bias as sb
from sparse_bias.synthetic import synthetic_cameras

PC = [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
IMG = (640, 1600)


def camera(yaw_deg, focal=1000.0):
    """lidar2img of a camera at the lidar origin looking along yaw (lidar: x fwd, y left, z up)."""
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    rot = torch.tensor([[s, -c, 0.0], [0.0, 0.0, -1.0], [c, s, 0.0]], dtype=torch.float64)
    ext = torch.eye(4, dtype=torch.float64)
    ext[:3, :3] = rot
    intr = torch.tensor([[focal, 0, 800, 0], [0, focal, 320, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float64)
    return intr @ ext


def normalise(points_m):
    lo, hi = torch.tensor(PC[:3], dtype=torch.float64), torch.tensor(PC[3:], dtype=torch.float64)
    return ((torch.tensor(points_m, dtype=torch.float64) - lo) / (hi - lo)).unsqueeze(0)


def test_hand_computed_front_and_back_cameras():
    layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(2, 40, 100))
    lidar2img = torch.stack([camera(0), camera(180)]).unsqueeze(0)       # [1, 2, 4, 4]
    points = [
        [10.0, 0.0, 0.0],     # straight ahead: principal point of view 0 -> pixel (800, 320) -> cell (20, 50)
        [10.0, 2.0, 1.0],     # pixel u = 800 - 1000*2/10 = 600, v = 320 - 1000*1/10 = 220 -> cell (13, 37)
        [-10.0, 0.0, -2.0],   # behind view 0, ahead of view 1: u = 800, v = 320 + 200 = 520 -> cell (32, 50)
        [10.0, 20.0, 0.0],    # u = 800 - 2000 = -1200: outside the image
        [0.0, 5.0, 0.0],      # depth 0 in both views
        [10.0, 0.0, 3.0],     # on the upper z bound: v = 320 - 300 = 20 -> cell (1, 50)
        [10.0, -7.9, 0.0],    # u = 800 + 790 = 1590 < 1600: inside -> col floor(1590 / 16) = 99
        [10.0, -8.5, 0.0],    # u = 1650: right of the image
    ]
    bev_pos, cam_pos = sb.project_points(normalise(points), PC, layout, lidar2img.float(), IMG, max_views=2)
    assert bev_pos.shape == (1, 8, 2) and cam_pos.shape == (1, 8, 2, 3)
    # BEV: col = floor((x + 54) / 108 * 180), row = floor((y + 54) / 108 * 180)
    assert bev_pos[0].tolist() == [[90, 106], [93, 106], [90, 73], [123, 106], [98, 90], [90, 106],
                                   [76, 106], [75, 106]]
    expected = [(0, 20, 50), (0, 13, 37), (1, 32, 50), None, None, (0, 1, 50), (0, 20, 99), None]
    for q, exp in enumerate(expected):
        first = tuple(cam_pos[0, q, 0].tolist())
        assert first == (exp if exp is not None else (-1, -1, -1)), q
        assert cam_pos[0, q, 1].tolist() == [-1, -1, -1]         # nothing is seen twice here


def test_upper_boundary_is_the_last_cell():
    layout = sb.KeyLayout(bev_shape=(180, 180))
    bev_pos, cam_pos = sb.project_points(torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]]), PC, layout)
    assert bev_pos.tolist() == [[[179, 179], [0, 0]]] and cam_pos is None


def test_matches_per_view_loop_on_synthetic_rig():
    """Overlapping cameras: the first two visible views, in view order, each with its own cell."""
    layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100))
    gen = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 300, 3, generator=gen, dtype=torch.float64)
    lidar2img = synthetic_cameras(2, IMG).double()
    _, cam_pos = sb.project_points(ref, PC, layout, lidar2img, IMG, max_views=2)
    lo, hi = torch.tensor(PC[:3], dtype=torch.float64), torch.tensor(PC[3:], dtype=torch.float64)
    seen_twice = 0
    for b in range(2):
        for q in range(300):
            p = torch.cat([ref[b, q] * (hi - lo) + lo, torch.ones(1, dtype=torch.float64)])
            visible = []
            for v in range(6):
                x, y, d, _ = (lidar2img[b, v] @ p).tolist()
                if d > 1e-5 and 0 <= x / d < 1600 and 0 <= y / d < 640:
                    visible.append([v, math.floor((y / d) * 40 / 640), math.floor((x / d) * 100 / 1600)])
            visible = (visible + [[-1, -1, -1]] * 2)[:2]
            assert cam_pos[b, q].tolist() == visible, (b, q)
            seen_twice += visible[1][0] >= 0
    assert seen_twice > 0          # the rig's neighbouring views do overlap


def test_max_views_and_more_slots_than_views():
    layout = sb.KeyLayout(cam_shape=(1, 40, 100))
    ref = normalise([[10.0, 0.0, 0.0]])
    _, cam_pos = sb.project_points(ref, PC, layout, camera(0).float()[None, None], IMG, max_views=3)
    assert cam_pos.tolist() == [[[[0, 20, 50], [-1, -1, -1], [-1, -1, -1]]]]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(ref_points=torch.zeros(1, 2, 2)), ValueError, r"ref_points must be \[B, Q, 3\]"),
    (dict(ref_points=torch.zeros(1, 2, 3, dtype=torch.long)), TypeError, "ref_points must be a floating"),
    (dict(ref_points=torch.full((1, 2, 3), float("nan"))), ValueError, "ref_points contains NaN"),
    (dict(pc_range=[0, 0, 0, 1, 1]), ValueError, "pc_range must be"),
    (dict(pc_range=[0, 0, 0, 1, -1, 1]), ValueError, "max > min"),
    (dict(lidar2img=torch.zeros(1, 5, 4, 4)), ValueError, r"lidar2img must be \[B, V, 4, 4\] = \[1, 6, 4, 4\]"),
    (dict(lidar2img=torch.zeros(1, 6, 4, 4), img_shape=None), ValueError, "img_shape must be"),
    (dict(lidar2img=torch.zeros(1, 6, 4, 4), img_shape=(640,)), ValueError, "img_shape must be"),
    (dict(max_views=0), ValueError, "max_views must be a positive int"),
    (dict(layout=(180, 180)), TypeError, "layout must be a KeyLayout"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(ref_points=torch.rand(1, 2, 3), pc_range=PC,
                layout=sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100)))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sb.project_points(**args)


def test_cameras_need_a_camera_layout():
    with pytest.raises(ValueError, match="no camera part"):
        sb.project_points(torch.rand(1, 2, 3), PC, sb.KeyLayout(bev_shape=(9, 9)), torch.zeros(1, 6, 4, 4), IMG)


@pytest.mark.parametrize("value", [-0.01, 1.2, 30.0])
def test_reference_points_outside_the_unit_cube_are_an_error(value):
    """Metric coordinates passed by mistake would silently give no windows: an error naming the normalisation."""
    ref = torch.full((1, 2, 3), 0.5)
    ref[0, 1, 0] = value
    with pytest.raises(ValueError, match=r"ref_points must be normalised to \[0, 1\] over pc_range"):
        sb.project_points(ref, PC, sb.KeyLayout(bev_shape=(9, 9)))
