import pytest
import torch

import sparse_bias as sb


def test_cmt_key_order():
    layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100))
    assert layout.num_keys == 56400 and layout.num_bev_keys == 32400 and layout.num_cam_keys == 24000
    assert layout.bev_key(2, 3) == 2 * 180 + 3
    assert layout.cam_key(1, 2, 3) == 32400 + 4000 + 200 + 3
    keys = torch.arange(layout.num_keys)
    source, view, row, col = layout.decode(keys)
    rebuilt = torch.where(source == 0, layout.bev_key(row, col), layout.cam_key(view.clamp(min=0), row, col))
    assert torch.equal(rebuilt, keys)
    assert int(source[:32400].sum()) == 0 and bool((view[:32400] == -1).all())


def test_single_modality_layouts():
    lidar = sb.KeyLayout(bev_shape=(128, 128))
    assert lidar.num_keys == 128 * 128 and lidar.num_cam_keys == 0
    camera = sb.KeyLayout(cam_shape=(6, 20, 50))
    assert camera.num_keys == 6000 and camera.cam_offset == 0 and camera.cam_key(1, 0, 0) == 1000
    _, view, row, col = camera.decode(torch.tensor([1051]))
    assert (view.item(), row.item(), col.item()) == (1, 1, 1)
    with pytest.raises(ValueError, match="no BEV part"):
        camera.bev_key(0, 0)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(), ValueError, "at least one"),
    (dict(bev_shape=(0, 5)), ValueError, "bev_shape must be a tuple of 2 positive ints"),
    (dict(bev_shape=(5, 5, 5)), ValueError, "bev_shape"),
    (dict(cam_shape=(6, 40)), ValueError, "cam_shape must be a tuple of 3 positive ints"),
    (dict(cam_shape=(6, 40.5, 100)), TypeError, "cam_shape must be a tuple of 3 ints"),
    (dict(bev_shape=180), TypeError, "bev_shape"),
])
def test_bad_layouts(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sb.KeyLayout(**kwargs)
