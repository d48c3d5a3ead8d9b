"""window_bias / SparseBias.to_dense against a brute-force dense bias (`reference.dense_bias`), and the profile
registry: every registered profile through the same checks, a profile registered for one test included."""
import pathlib
import re

import pytest
import torch
from helpers import profile_names, random_positions
from hypothesis import given
from hypothesis import strategies as st

import reference
import sparse_bias as sb
from reference import default_sigma, dense_bias, falloff, window_entries
from sparse_bias.profiles import PROFILES, get_profile

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMALL = sb.KeyLayout(bev_shape=(12, 10), cam_shape=(3, 6, 8))


def weights(shape, gen, per_head=None, dtype=torch.float64):
    tail = () if per_head is None else (per_head,)
    return (2 * torch.rand(shape + tail, generator=gen, dtype=dtype) - 1)


def check_to_dense_matches_brute_force(profile, heads, mixed, sigma, adaptive, seed):
    """``window_bias(...).to_dense()`` equals `reference.dense_bias` (shapes and values) under ``profile``."""
    gen = torch.Generator().manual_seed(seed)
    batch, queries = 2, 4
    bev_pos, cam_pos = random_positions(SMALL, batch, queries, 2, gen)
    bev_window = 2 * torch.randint(0, 4, (batch, queries), generator=gen) + 1 if adaptive else 5
    cam_window = 3
    win = sb.local_windows(SMALL, bev_pos, cam_pos, bev_window, cam_window)
    wb = weights((batch, queries), gen, heads)
    wc = weights((batch, queries), gen, None if mixed else heads)     # shared + per-head mix
    bias = sb.window_bias(win, wb, wc, scale=1.7, profile=profile, sigma=sigma)
    expected = dense_bias(SMALL, bev_pos, cam_pos, bev_window, cam_window, wb, wc, scale=1.7,
                          profile=profile, sigma=sigma)
    dense = bias.to_dense()
    assert dense.shape == bias.shape == expected.shape
    torch.testing.assert_close(dense, expected, rtol=1e-12, atol=1e-12)


@given(profile=st.sampled_from(profile_names()), heads=st.sampled_from([None, 1, 3]),
       mixed=st.booleans(), sigma=st.sampled_from([None, 0.7, (1.5, 2.5)]), adaptive=st.booleans(),
       seed=st.integers(0, 2**31))
def test_to_dense_matches_brute_force(profile, heads, mixed, sigma, adaptive, seed):
    check_to_dense_matches_brute_force(profile, heads, mixed, sigma, adaptive, seed)


def test_cmt_shape_values_and_memory():
    layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100))
    win = sb.local_windows(layout, torch.tensor([[[90, 90], [0, 0]]]), torch.tensor([[[0, 20, 50], [-1, 0, 0]]]))
    bias = sb.window_bias(win, torch.tensor([[0.5, 1.0]]), torch.tensor([[2.0, 3.0]]), scale=0.5)
    dense = bias.to_dense()
    assert dense.shape == (1, 2, 56400)
    assert dense[0, 0, :32400].sum() == 0.25 * 225 and dense[0, 0, 32400:].sum() == 1.0 * 225
    assert dense[0, 1].sum() == 0.5 * 64
    assert bias.nbytes() == win.nbytes() + 4 * win.nnz


def test_gradients_reach_weights_and_learnable_scale():
    gen = torch.Generator().manual_seed(3)
    bev_pos, cam_pos = random_positions(SMALL, 1, 5, 2, gen, p_missing=0.0)
    win = sb.local_windows(SMALL, bev_pos, cam_pos, 3, 3)
    wb = weights((1, 5), gen, 2).requires_grad_()
    wc = weights((1, 5), gen, 2).requires_grad_()
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def f(wb, wc, scale):
        return sb.window_bias(win, wb, wc, scale=scale, profile="gaussian").to_dense()

    assert torch.autograd.gradcheck(f, (wb, wc, scale))
    f(wb, wc, scale).sum().backward()
    assert scale.grad is not None and wb.grad.abs().sum() > 0 and wc.grad.abs().sum() > 0


def test_single_modality_weight_may_be_none():
    layout = sb.KeyLayout(bev_shape=(8, 8))
    win = sb.local_windows(layout, torch.tensor([[[3, 3]]]), None, 3)
    bias = sb.window_bias(win, torch.ones(1, 1), None)
    assert bias.values.tolist() == [1.0] * 9


def test_float32_weights_give_float32_values():
    win = sb.local_windows(SMALL, torch.tensor([[[3, 3]]]), torch.tensor([[[0, 2, 2]]]), 3, 3)
    bias = sb.window_bias(win, torch.ones(1, 1), torch.ones(1, 1, dtype=torch.float16))
    assert bias.dtype == torch.float32


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(bev_weight=None), ValueError, "bev_weight is required"),
    (dict(cam_weight=None), ValueError, "cam_weight is required"),
    (dict(bev_weight=torch.ones(1, 3)), ValueError, r"bev_weight must be \[B, Q\] or \[B, Q, H\] with \[B, Q\] = \[1, 2\]"),
    (dict(bev_weight=torch.ones(2)), ValueError, "bev_weight must have 2 or 3 dimensions"),
    (dict(cam_weight=torch.ones(1, 2, dtype=torch.long)), TypeError, "cam_weight must be a floating"),
    (dict(cam_weight=torch.tensor([[1.0, float("nan")]])), ValueError, "cam_weight contains NaN"),
    (dict(bev_weight=torch.ones(1, 2, 2), cam_weight=torch.ones(1, 2, 3)), ValueError, "disagree on the number of heads"),
    (dict(scale=float("nan")), ValueError, "scale must be a finite number"),
    (dict(scale="1"), ValueError, "scale must be"),
    (dict(scale=torch.ones(2)), ValueError, "scale must be a number or a 0-d tensor"),
    (dict(profile="cosine"), ValueError, "profile must be one of"),
    (dict(profile="gaussian", sigma=0.0), ValueError, "sigma must be a positive number"),
    (dict(profile="gaussian", sigma=(1.0, 2.0, 3.0)), ValueError, r"sigma must be a number or a \(bev, cam\) pair"),
    (dict(win="windows"), TypeError, "win must be a WindowIndex"),
])
def test_bad_input(kwargs, exc, match, debug_checks):
    win = sb.local_windows(SMALL, torch.tensor([[[3, 3], [4, 4]]]), torch.tensor([[[0, 2, 2], [1, 1, 1]]]), 3, 3)
    args = dict(win=win, bev_weight=torch.ones(1, 2), cam_weight=torch.ones(1, 2))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        sb.window_bias(**args)


def test_sparse_bias_checks_its_values():
    win = sb.local_windows(SMALL, torch.tensor([[[3, 3]]]), None, 3)
    with pytest.raises(ValueError, match=r"values must be \[nnz\] or \[nnz, H\] with nnz = 9"):
        sb.SparseBias(win, torch.ones(8))
    with pytest.raises(TypeError, match="values must be a floating"):
        sb.SparseBias(win, torch.ones(9, dtype=torch.long))
    with pytest.raises(TypeError, match="index must be a WindowIndex"):
        sb.SparseBias(None, torch.ones(9))
    bias = sb.SparseBias(win, torch.ones(9, 4))
    assert bias.num_heads == 4 and bias.shape == (1, 4, 1, SMALL.num_keys)
    assert bias.to(torch.float16).dtype == torch.float16


# --- the profile registry (sparse_bias.profiles) ---------------------------------------------------------------


OFFSETS = (torch.tensor([0.0, 1.0, -2.0, 3.0], dtype=torch.float64),           # dy, dx, sigma
           torch.tensor([0.0, -1.0, 2.0, 0.5], dtype=torch.float64),
           torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64))


def documented_profiles():
    """The profile names docs/conventions.md defines in its "Bias profiles" section (`` `name`: `f = ...` ``)."""
    text = (ROOT / "docs" / "conventions.md").read_text()
    section = text.split("## Bias profiles", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"`(\w+)`:\s+`f = ", section)


def test_the_documented_profiles_are_the_registered_ones():
    assert sorted(documented_profiles()) == sorted(PROFILES) == sorted(reference.FORMULAS)


def check_registered_formula(name):
    """The registered function of ``name`` computes the formula written out in `reference.FORMULAS`."""
    torch.testing.assert_close(get_profile(name)(*OFFSETS), falloff(name, *OFFSETS), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", profile_names())
def test_registered_profiles_are_the_documented_formulas(name):
    check_registered_formula(name)


def test_get_profile_refuses_unknown_names_naming_the_choices():
    with pytest.raises(ValueError, match=re.escape(f"profile must be one of {tuple(PROFILES)}, got 'cosine'")):
        get_profile("cosine")
    with pytest.raises(ValueError, match="profile must be one of"):
        get_profile(["flat"])


def check_profile_through_window_bias(name, sigma, heads):
    """Entry by entry (offsets from the brute-force window enumeration): ``weight * scale * f(dy, dx, sigma)``,
    sigma per entry as documented (None: ``max(size // 2, 1) / 2`` of the entry's own, here adaptive, window)."""
    gen = torch.Generator().manual_seed(7)
    batch, queries = 2, 3
    bev_pos, cam_pos = random_positions(SMALL, batch, queries, 2, gen)
    bev_window = 2 * torch.randint(0, 4, (batch, queries), generator=gen) + 1
    cam_window = 5
    win = sb.local_windows(SMALL, bev_pos, cam_pos, bev_window, cam_window)
    wb, wc = weights((batch, queries), gen, heads), weights((batch, queries), gen, heads)
    bias = sb.window_bias(win, wb, wc, scale=0.6, profile=name, sigma=sigma)
    expected = []
    for b in range(batch):
        for q in range(queries):
            for _, source, dy, dx in window_entries(SMALL, bev_pos, cam_pos, bev_window, cam_window, b, q):
                size = int(bev_window[b, q]) if source == 0 else cam_window
                s = (default_sigma(size) if sigma is None
                     else (sigma[source] if isinstance(sigma, tuple) else sigma))
                f = falloff(name, *(torch.tensor(float(v), dtype=torch.float64) for v in (dy, dx, s)))
                expected.append((wb if source == 0 else wc)[b, q] * 0.6 * f)
    assert len(expected) == win.nnz
    torch.testing.assert_close(bias.values, torch.stack(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", profile_names())
@pytest.mark.parametrize("sigma", [None, 0.8, (1.5, 2.5)])
@pytest.mark.parametrize("heads", [None, 2])
def test_every_registered_profile_through_window_bias_matches_its_formula(name, sigma, heads):
    check_profile_through_window_bias(name, sigma, heads)


# --- a profile registered for one test -------------------------------------------------------------------------

def cauchy(dy, dx, sigma):
    """A profile the library does not ship: ``1 / (1 + (dy^2 + dx^2) / sigma^2)``."""
    return torch.reciprocal(1 + (dy * dy + dx * dx) / (sigma * sigma))


def test_a_newly_registered_profile_goes_through_every_profile_check(monkeypatch):
    """Registering a profile (its function in `PROFILES`, its formula in `reference.FORMULAS`) is all the profile
    tests need: the names they parametrise over include it, and the checks behind every parametrised profile test
    (this file, test_index_validation.py, test_nn.py, test_flex.py, test_differential.py) pass on it. Both
    registrations are undone after the test."""
    import test_differential
    import test_index_validation
    import test_nn

    name = "cauchy"
    monkeypatch.setitem(PROFILES, name, cauchy)
    monkeypatch.setitem(reference.FORMULAS, name, lambda dy, dx, sigma: 1 / (1 + (dy ** 2 + dx ** 2) / sigma ** 2))
    assert name in profile_names()
    assert not torch.equal(get_profile(name)(*OFFSETS), torch.ones(4, dtype=torch.float64))   # not flat in disguise

    check_registered_formula(name)
    for sigma in (None, 0.8, (1.5, 2.5)):
        for heads in (None, 2):
            check_profile_through_window_bias(name, sigma, heads)
    for heads, mixed, sigma, adaptive in [(None, False, None, True), (3, True, 0.7, False), (1, False, (1.5, 2.5), True)]:
        check_to_dense_matches_brute_force(name, heads, mixed, sigma, adaptive, seed=11)
    test_index_validation.check_weight_gradients(name)
    for per_head in (False, True):
        test_nn.check_generator_dense_mode(name, per_head)
    try:
        import test_flex
    except pytest.skip.Exception:                           # no FlexAttention in this torch: that check skips
        test_flex = None
    if test_flex is not None:
        test_flex.check_flex_score_mod_profile(name, (5, 3), (0.8, 1.7))
        test_flex.check_flex_score_mod_profile(name, (3, 7), None)
    for entry in ("sba", "win"):
        for sigma in (None, (1.5, 0.6)):
            test_differential.check_profile_case(entry, name, sigma)
