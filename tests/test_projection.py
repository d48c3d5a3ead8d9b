"""project_points against hand-computed pinhole cameras."""
import math

import pytest
import torch

import sparse_bias as sb
from sparse_bias.tools.synthetic import synthetic_cameras

import reference

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


def test_points_just_outside_pc_range_get_no_bev_window_and_leave_the_batch_alone():
    """Propagated / denoised queries leave [0, 1] a little: no BEV window for them, cameras still see them."""
    layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(2, 40, 100))
    lidar2img = torch.stack([camera(0), camera(180)]).unsqueeze(0)
    inside = normalise([[10.0, 0.0, 0.0], [10.0, 2.0, 1.0], [-10.0, 0.0, -2.0], [3.0, -4.0, 1.5]])
    outside = torch.tensor([[[1.05, 0.4956, 0.5656],  # 59.4 m ahead: off the BEV grid, in view 0 (808, 328) px
                             [0.5, -0.05, 0.5],       # below y_min
                             [-0.05, 0.4956, 0.5656], # 59.4 m behind: in view 1 at (792, 328) px
                             [0.75, 0.5, 1.05],       # above z_max: z selects no BEV cell, so the window stays
                             [0.5, 0.5, -0.05]]], dtype=torch.float64)
    ref = torch.cat([inside[:, :2], outside, inside[:, 2:]], dim=1)
    bev_pos, cam_pos = sb.project_points(ref, PC, layout, lidar2img, IMG)
    bev_in, cam_in = sb.project_points(inside, PC, layout, lidar2img, IMG)
    keep = [0, 1, 7, 8]
    assert torch.equal(bev_pos[:, keep], bev_in) and torch.equal(cam_pos[:, keep], cam_in)
    assert bev_pos[0, 2:7].tolist() == [[-1, -1], [-1, -1], [-1, -1], [90, 135], [90, 90]]
    # (x, y, z) = (59.4, -0.4752, -0.4752) m: u = 800 + 1000 * 0.4752 / 59.4 = 808, v = 328 -> cell (20, 50)
    assert cam_pos[0, 2].tolist() == [[0, 20, 50], [-1, -1, -1]]
    assert cam_pos[0, 4].tolist() == [[1, 20, 49], [-1, -1, -1]]
    assert cam_pos[0, 5].tolist() == [[0, 12, 50], [-1, -1, -1]]     # 3.4 m high at 27 m: v = 194.1 px

    # Their windows: none on the BEV grid, the camera window as for any point; the other queries unchanged.
    win = sb.local_windows(layout, bev_pos, cam_pos, bev_window=5, cam_window=3)
    win_in = sb.local_windows(layout, bev_in, cam_in, bev_window=5, cam_window=3)
    per_query = win.source.new_zeros(9, 2, dtype=torch.long).index_put_(
        (win.row, win.source.long()), torch.ones_like(win.row), accumulate=True)
    assert per_query[2:7].tolist() == [[0, 9], [0, 0], [0, 9], [25, 9], [25, 0]]
    dense, dense_in = win.to_dense_mask()[0], win_in.to_dense_mask()[0]
    assert torch.equal(dense[keep], dense_in)

    # Attention over those windows: the camera-only queries attend to their camera window, the query with no
    # window at all gets zeros (a fully masked row), exactly as the dense masked softmax.
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=gen, dtype=torch.float64)
               for n in (9, layout.num_keys, layout.num_keys))
    out = sb.window_attention(q, k, v, win)
    expected = reference.window_attention(q, k, v, win)
    assert torch.allclose(out, expected, atol=1e-12) and (out[:, :, 3] == 0).all()


@pytest.mark.parametrize("value", [-0.5, 1.5])
def test_range_rule_boundary_is_accepted(value):
    """[-0.5, 1.5] is accepted (no BEV window outside [0, 1]); the next float beyond is refused."""
    ref = torch.full((1, 2, 3), 0.5, dtype=torch.float64)
    ref[0, 1, 0] = value
    bev_pos, _ = sb.project_points(ref, PC, sb.KeyLayout(bev_shape=(9, 9)))
    assert bev_pos.tolist() == [[[4, 4], [-1, -1]]]
    ref[0, 1, 0] = torch.nextafter(torch.tensor(value, dtype=torch.float64),
                                   torch.tensor(value * 10, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"within \[-0.5, 1.5\].*metric coordinates\?"):
        sb.project_points(ref, PC, sb.KeyLayout(bev_shape=(9, 9)))


@pytest.mark.parametrize("value, axis", [(-0.51, 0), (1.51, 1), (30.0, 0), (-5.0, 2), (3.0, 2)])
def test_values_that_cannot_be_normalised_are_an_error(value, axis):
    """Metric coordinates passed by mistake would silently give no windows: an error naming the normalisation
    and the offending entry."""
    ref = torch.full((1, 2, 3), 0.5)
    ref[0, 1, axis] = value
    with pytest.raises(ValueError, match=rf"ref_points must be normalised over pc_range.*ref_points\[0, 1, {axis}\]"):
        sb.project_points(ref, PC, sb.KeyLayout(bev_shape=(9, 9)))


def test_a_batch_of_metric_points_is_an_error():
    with pytest.raises(ValueError, match=r"metric coordinates\?"):
        sb.project_points(torch.tensor([[[10.0, 0.0, 0.0], [-20.0, 5.0, 1.0]]]), PC,
                          sb.KeyLayout(bev_shape=(180, 180)))


def test_img_shape_as_width_height_is_refused_by_the_layout_aspect():
    """(1600, 640) read as (h, w) gives 40 x 6.4 px per cell of a 40 x 100 feature map; read swapped 16 x 16."""
    layout = sb.KeyLayout(cam_shape=(2, 40, 100))
    lidar2img = torch.stack([camera(0), camera(180)]).unsqueeze(0)
    with pytest.raises(ValueError, match=r"img_shape must be the padded image \(height, width\), got \(1600, 640\)"
                                         r".*height 1600, width 640.*height 640, width 1600.*img_shape=\(640, 1600\)"):
        sb.project_points(normalise([[10.0, 0.0, 0.0]]), PC, layout, lidar2img, (1600, 640))


def test_img_shape_as_width_height_is_refused_by_the_principal_point():
    """With the layout transposed as well the strides agree; the cameras' principal point (800, 320) lies outside
    an image 1600 high and 640 wide, inside one 640 high and 1600 wide."""
    layout = sb.KeyLayout(cam_shape=(2, 100, 40))
    lidar2img = torch.stack([camera(0), camera(180)]).unsqueeze(0)
    with pytest.raises(ValueError, match=r"img_shape must be .*principal point \(cx, cy\) = \(800.0, 320.0\)"
                                         r".*img_shape=\(640, 1600\)"):
        sb.project_points(normalise([[10.0, 0.0, 0.0]]), PC, layout, lidar2img, (1600, 640))


def test_principal_point_of_a_rotated_skewed_camera():
    """cx, cy are read back from lidar2img = K [R | t] for any rotation, translation and skew."""
    from sparse_bias.projection import _principal_points
    intr = torch.tensor([[900.0, 3.0, 611.0, 0], [0, 950.0, 277.0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
                        dtype=torch.float64)
    ext = torch.eye(4, dtype=torch.float64)
    ext[:3, :3] = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))[0]
    ext[:3, 3] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    cx, cy, valid = _principal_points((2.0 * intr @ ext)[None, None])        # a scaled matrix: the same camera
    assert valid.item() and cx.item() == pytest.approx(611.0) and cy.item() == pytest.approx(277.0)


@pytest.mark.parametrize("img_shape, cam_shape", [((640, 1600), (2, 40, 100)), ((900, 1600), (2, 57, 100)),
                                                  ((1000, 1000), (2, 50, 50))])
def test_matching_img_shapes_are_accepted(img_shape, cam_shape):
    """No refusal for a consistent (height, width), an unpadded height, a square image, a view cropped so its
    principal point leaves the image (the other view keeps it), or matrices of no camera (zeros)."""
    lidar2img = torch.stack([camera(0), camera(180)]).unsqueeze(0)
    lidar2img[0, 1, 0, :] += 1000.0 * lidar2img[0, 1, 2, :]                  # view 1: cx 800 -> 1800, outside
    layout = sb.KeyLayout(cam_shape=cam_shape)
    sb.project_points(normalise([[10.0, 0.0, 0.0]]), PC, layout, lidar2img, img_shape)
    _, cam_pos = sb.project_points(normalise([[10.0, 0.0, 0.0]]), PC, layout, torch.zeros(1, 2, 4, 4), img_shape)
    assert (cam_pos == -1).all()

