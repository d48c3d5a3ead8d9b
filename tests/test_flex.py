"""`sb.flex.flex_score_mod` against the dense reference (forward: FlexAttention has no eager CPU backward)."""
import pytest
import torch

import sparse_bias as sb
from sparse_bias.flex import flex_score_mod
from sparse_bias.synthetic import synthetic_scene

flex_attention = pytest.importorskip("torch.nn.attention.flex_attention").flex_attention


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("windows", [(5, 5), (3, 7)])
def test_flex_score_mod_equals_the_window_bias(windows):
    scene = synthetic_scene(2, 16, config="small", seed=1)
    win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, *windows)
    gen = torch.Generator().manual_seed(0)
    nk = scene.layout.num_keys
    q = torch.randn(2, 2, 16, 16, generator=gen)
    k, v = torch.randn(2, 2, nk, 16, generator=gen), torch.randn(2, 2, nk, 16, generator=gen)
    wb, wc = 2 * torch.rand(2, 16, generator=gen) - 1, 2 * torch.rand(2, 16, generator=gen) - 1
    mod = flex_score_mod(scene.layout, scene.bev_pos, scene.cam_pos, *windows, wb, wc)
    torch.testing.assert_close(flex_attention(q, k, v, score_mod=mod),
                               sb.dense_bias_attention(q, k, v, sb.window_bias(win, wb, wc).to_dense()),
                               rtol=1e-5, atol=1e-6)


def test_flex_score_mod_needs_both_modalities():
    with pytest.raises(ValueError, match="layout must have a BEV grid and camera views"):
        flex_score_mod(sb.KeyLayout(bev_shape=(4, 4)), None, None, 3, 3, None, None)
