"""local_windows against a brute-force window enumeration (`reference.window_entries`)."""
import pytest
import torch
from helpers import layouts, odd_or_zero, random_positions
from hypothesis import given
from hypothesis import strategies as st
from reference import window_entries

import sparse_bias as sb

CMT = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100))


def check_against_brute(layout, bev_pos, cam_pos, bev_window, cam_window):
    win = sb.local_windows(layout, bev_pos, cam_pos, bev_window=bev_window, cam_window=cam_window)
    batch, queries = (bev_pos if bev_pos is not None else cam_pos).shape[:2]
    assert win.indptr.shape == (batch * queries + 1,)
    assert win.indptr[0] == 0 and win.indptr[-1] == win.nnz
    assert win.key.dtype == torch.long and win.source.dtype == torch.int8
    for b in range(batch):
        for q in range(queries):
            lo, hi = int(win.indptr[b * queries + q]), int(win.indptr[b * queries + q + 1])
            got = list(zip(win.key[lo:hi].tolist(), win.source[lo:hi].tolist(), win.dy[lo:hi].tolist(),
                           win.dx[lo:hi].tolist()))
            expected = window_entries(layout, bev_pos, cam_pos, bev_window, cam_window, b, q)
            assert got == expected, (b, q)            # same entries, keys ascending (sorted) and unique
            assert all(k1 < k2 for (k1, *_), (k2, *_) in zip(got, got[1:]))
    assert torch.equal(win.row, torch.repeat_interleave(torch.arange(batch * queries), win.counts().flatten()))
    return win


@given(layout=layouts(), batch=st.integers(1, 2), queries=st.integers(0, 6), slots=st.integers(1, 3),
       bev_window=odd_or_zero, cam_window=odd_or_zero, adaptive=st.booleans(), seed=st.integers(0, 2**31))
def test_random_layouts_match_brute_force(layout, batch, queries, slots, bev_window, cam_window, adaptive,
                                          seed):
    gen = torch.Generator().manual_seed(seed)
    bev_pos, cam_pos = random_positions(layout, batch, queries, slots, gen)
    if adaptive:   # per-query sizes drawn from {0, 1, 3, ..., 11}
        bev_window = 2 * torch.randint(0, 6, (batch, queries), generator=gen) + 1
        cam_window = 2 * torch.randint(0, 6, (batch, queries), generator=gen) + 1
        bev_window[torch.rand(batch, queries, generator=gen) < 0.2] = 0
    if cam_pos is not None and slots == 1 and seed % 2:
        cam_pos = cam_pos[:, :, 0]                     # the [B, Q, 3] form
    check_against_brute(layout, bev_pos, cam_pos, bev_window, cam_window)


@pytest.mark.parametrize("cell", [(0, 0), (0, 179), (179, 0), (179, 179), (3, 90), (90, 176), (90, 90)])
def test_bev_border_cells_are_clipped_in_2d(cell):
    bev_pos = torch.tensor([[list(cell)]])
    win = check_against_brute(CMT, bev_pos, None, 15, 15)
    rows = min(cell[0] + 7, 179) - max(cell[0] - 7, 0) + 1
    cols = min(cell[1] + 7, 179) - max(cell[1] - 7, 0) + 1
    assert win.nnz == rows * cols
    assert int(win.key.max()) < CMT.num_bev_keys        # never spills into the cameras


@pytest.mark.parametrize("cell", [(0, 0, 0), (0, 39, 99), (5, 39, 99), (2, 0, 50), (3, 20, 0), (1, 20, 99)])
def test_camera_windows_never_cross_a_view(cell):
    win = check_against_brute(CMT, None, torch.tensor([[list(cell)]]), 15, 15)
    view = torch.div(win.key - CMT.cam_offset, 4000, rounding_mode="floor")
    assert bool((view == cell[0]).all())


def test_two_views_and_view_order():
    # slots given in descending view order come out with ascending keys
    cam_pos = torch.tensor([[[[4, 10, 10], [1, 39, 0]], [[-1, 0, 0], [-1, 0, 0]]]])
    bev_pos = torch.tensor([[[5, 5], [-1, 7]]])
    win = check_against_brute(CMT, bev_pos, cam_pos, 5, 15)
    assert win.counts().tolist() == [[25 + 8 * 8 + 15 * 15, 0]]
    assert torch.equal(win.source[:25], torch.zeros(25, dtype=torch.int8))


def test_empty_cases():
    win = sb.local_windows(CMT, torch.full((2, 3, 2), -1), torch.full((2, 3, 2, 3), -1))
    assert win.nnz == 0 and win.indptr.tolist() == [0] * 7
    win = sb.local_windows(CMT, torch.zeros(1, 0, 2, dtype=torch.long), None)
    assert win.nnz == 0 and win.indptr.tolist() == [0]
    win = sb.local_windows(CMT, torch.tensor([[[9, 9]]]), torch.tensor([[[1, 2, 3]]]), bev_window=0, cam_window=0)
    assert win.nnz == 0


def test_window_of_one_is_the_cell():
    win = sb.local_windows(CMT, torch.tensor([[[2, 3]]]), torch.tensor([[[1, 2, 3]]]), 1, 1)
    assert win.key.tolist() == [2 * 180 + 3, CMT.cam_key(1, 2, 3)]


def test_adaptive_sizes_per_query():
    bev_pos = torch.tensor([[[50, 50], [60, 60], [70, 70]]])
    sizes = torch.tensor([[5, 25, 0]])
    win = check_against_brute(CMT, bev_pos, None, sizes, 15)
    assert win.counts().tolist() == [[25, 625, 0]]


def test_dense_mask_and_half_size():
    gen = torch.Generator().manual_seed(1)
    bev_pos, cam_pos = random_positions(CMT, 2, 5, 2, gen)
    win = sb.local_windows(CMT, bev_pos, cam_pos, 5, torch.full((2, 5), 9))
    mask = win.to_dense_mask()
    assert mask.shape == (2, 5, CMT.num_keys) and int(mask.sum()) == win.nnz
    assert torch.equal(win.half_size(), torch.where(win.source == 0, 2, 4))


def test_to_device_copy():
    win = sb.local_windows(CMT, torch.tensor([[[2, 3]]]), None, 3)
    moved = win.to("cpu")
    assert torch.equal(moved.key, win.key) and moved.nnz == win.nnz


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("size, exc, match", [
    (4, ValueError, "bev_window must be an odd"), (-3, ValueError, "bev_window must be an odd"),
    (2.0, TypeError, "bev_window must be an odd int"), (True, TypeError, "bev_window"),
    (torch.tensor([[3, 4]]), ValueError, "bev_window must hold odd sizes"),
    (torch.tensor([[3, -1]]), ValueError, "bev_window must be >= 0"),
    (torch.tensor([[3.0, 5.0]]), TypeError, "bev_window must be an integer tensor"),
    (torch.tensor([3, 5]), ValueError, r"bev_window must be an odd int or a LongTensor \[B, Q\]"),
])
def test_bad_window_sizes(size, exc, match):
    with pytest.raises(exc, match=match):
        sb.local_windows(CMT, torch.tensor([[[2, 3], [4, 5]]]), None, bev_window=size)


@pytest.mark.parametrize("bev_pos, cam_pos, exc, match", [
    (torch.tensor([[[180, 3]]]), None, ValueError, r"bev_pos\[0, 0\]: row 180 is out of range \[0, 180\)"),
    (torch.tensor([[[3, 180]]]), None, ValueError, "col 180 is out of range"),
    (torch.tensor([[[3, -2]]]), None, ValueError, "col -2 is out of range"),
    (torch.tensor([[[2.0, 3.0]]]), None, TypeError, "bev_pos must be an integer tensor"),
    (torch.tensor([[2, 3]]), None, ValueError, r"bev_pos must have 3 dimensions"),
    (torch.tensor([[[2, 3, 4]]]), None, ValueError, r"bev_pos must be \[B, Q, 2\]"),
    (None, torch.tensor([[[6, 0, 0]]]), ValueError, "view 6 is out of range"),
    (None, torch.tensor([[[0, 40, 0]]]), ValueError, "row 40 is out of range"),
    (None, torch.tensor([[[0, 0, 100]]]), ValueError, "col 100 is out of range"),
    (None, torch.tensor([[[[1, 0, 0], [1, 5, 5]]]]), ValueError, "names view 1 twice"),
    (None, torch.tensor([[[1, 0]]]), ValueError, r"cam_pos must be \[B, Q, 3\]"),
    (None, "cells", TypeError, "cam_pos must be a torch.Tensor"),
    (torch.tensor([[[2, 3]]]), torch.tensor([[[1, 0, 0], [1, 0, 0]]]), ValueError, "bev_pos is for"),
    (None, None, ValueError, "needs bev_pos, cam_pos or both"),
])
def test_bad_positions(bev_pos, cam_pos, exc, match):
    with pytest.raises(exc, match=match):
        sb.local_windows(CMT, bev_pos, cam_pos)


def test_positions_need_the_matching_layout_part():
    with pytest.raises(ValueError, match="no BEV part"):
        sb.local_windows(sb.KeyLayout(cam_shape=(6, 40, 100)), torch.tensor([[[2, 3]]]))
    with pytest.raises(ValueError, match="no camera part"):
        sb.local_windows(sb.KeyLayout(bev_shape=(9, 9)), None, torch.tensor([[[0, 0, 0]]]))
    with pytest.raises(TypeError, match="layout must be a KeyLayout"):
        sb.local_windows((180, 180), torch.tensor([[[2, 3]]]))


def test_window_size_tensor_device_and_shape_must_match():
    with pytest.raises(ValueError, match=r"cam_window must be an odd int or a LongTensor \[B, Q\] = \[1, 1\]"):
        sb.local_windows(CMT, None, torch.tensor([[[0, 1, 1]]]), cam_window=torch.tensor([[3, 3]]))
