"""`sb.flex.flex_score_mod` against the reference (tests/reference.py; forward: FlexAttention has no eager CPU
backward)."""
import inspect
import re

import pytest
import torch
from helpers import profile_names

import reference
import sparse_bias as sb
from sparse_bias.flex import flex_score_mod
from sparse_bias.profiles import PROFILES
from sparse_bias.tools.synthetic import synthetic_scene

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
                               reference.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc)),
                               rtol=1e-5, atol=1e-6)


def test_flex_score_mod_needs_both_modalities():
    with pytest.raises(ValueError, match="layout must have a BEV grid and camera views"):
        flex_score_mod(sb.KeyLayout(bev_shape=(4, 4)), None, None, 3, 3, None, None)


#: window_bias's default profile (`test_flex_score_mod_equals_the_window_bias`)
DEFAULT_PROFILE = inspect.signature(sb.window_bias).parameters["profile"].default


def check_flex_score_mod_profile(profile, windows, sigma):
    """flex_score_mod with ``profile`` and ``sigma`` gives the attention of window_bias's dense bias."""
    scene = synthetic_scene(2, 16, config="small", seed=2)
    win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, *windows)
    gen = torch.Generator().manual_seed(1)
    nk = scene.layout.num_keys
    q = torch.randn(2, 2, 16, 16, generator=gen)
    k, v = torch.randn(2, 2, nk, 16, generator=gen), torch.randn(2, 2, nk, 16, generator=gen)
    wb, wc = 2 * torch.rand(2, 16, generator=gen) - 1, 2 * torch.rand(2, 16, generator=gen) - 1
    mod = flex_score_mod(scene.layout, scene.bev_pos, scene.cam_pos, *windows, wb, wc, profile=profile, sigma=sigma)
    bias = sb.window_bias(win, wb, wc, profile=profile, sigma=sigma).to_dense()
    flat = sb.window_bias(win, wb, wc).to_dense()
    assert not torch.allclose(bias, flat)                # the falloff is really there
    torch.testing.assert_close(flex_attention(q, k, v, score_mod=mod), reference.attention(q, k, v, bias),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("windows, sigma", [((5, 5), None), ((3, 7), None), ((5, 3), (0.8, 1.7)), ((5, 5), 1.2)])
@pytest.mark.parametrize("profile", [p for p in profile_names() if p != DEFAULT_PROFILE])
def test_flex_score_mod_profile_equals_the_window_bias(profile, windows, sigma):
    """Every registered profile besides the default (the test above)."""
    check_flex_score_mod_profile(profile, windows, sigma)


def test_flex_score_mod_refuses_an_unknown_profile_by_name():
    layout = sb.KeyLayout(bev_shape=(4, 4), cam_shape=(1, 4, 4))
    with pytest.raises(ValueError, match=re.escape(f"profile must be one of {tuple(PROFILES)}, got 'cosine'")):
        flex_score_mod(layout, None, None, 3, 3, torch.ones(1, 1), torch.ones(1, 1), profile="cosine")


def test_flex_score_mod_checks_sigma_as_window_bias_does():
    layout = sb.KeyLayout(bev_shape=(4, 4), cam_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        flex_score_mod(layout, None, None, 3, 3, torch.ones(1, 1), torch.ones(1, 1), profile="gaussian", sigma=0.0)
