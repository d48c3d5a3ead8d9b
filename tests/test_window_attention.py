"""window_attention against the reference (tests/reference.py): attention restricted to the window keys."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES
from helpers import (SMALL, WINDOW_BACKENDS, layouts, make_case, odd_or_zero, random_positions, skip_missing,
                     skip_without_matmul)
from hypothesis import given
from hypothesis import strategies as st

import sparse_bias as sb

import reference

BACKENDS = WINDOW_BACKENDS + ["dense"]
NAMES = ["out", "dq", "dk", "dv", "d_bias"]


def case(layout=SMALL, batch=2, heads=3, queries=7, dim=8, seed=0, bev_window=5, cam_window=3, slots=2,
         bias="shared", dtype=torch.float64, device="cpu", p_missing=0.2):
    gen = torch.Generator().manual_seed(seed)
    bev_pos, cam_pos = random_positions(layout, batch, queries, slots, gen, p_missing=p_missing)
    win = sb.local_windows(layout, bev_pos, cam_pos, bev_window, cam_window).to(device)
    nk = layout.num_keys
    q, k, v = (torch.randn(batch, heads, n, dim, generator=gen, dtype=torch.float64).to(device, dtype)
               for n in (queries, nk, nk))
    values = None
    if bias is not None:
        shape = (win.nnz,) if bias == "shared" else (win.nnz, heads)
        values = (3 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1.5).to(device, dtype)
    return win, q, k, v, values


def sdpa_window(q, k, v, win, values=None):
    """The dense version in the inputs' dtype, the naive same-precision yardstick: SDPA with the window's bool mask
    ``[B, 1, Q, K]`` (and the dense bias as a float mask), fully masked rows -> 0."""
    allowed = win.to_dense_mask().unsqueeze(1)
    valid = allowed.any(-1, keepdim=True)
    allowed = allowed | ~valid                              # keep SDPA finite on the rows zeroed below
    if values is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) * valid
    dense = sb.SparseBias(win, values).to_dense()
    dense = dense.unsqueeze(1) if dense.dim() == 3 else dense
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense.masked_fill(~allowed, float("-inf"))) * valid


def fwd_grads(fn, q, k, v, values, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    vals = None if values is None else values.detach().clone().requires_grad_()
    out = fn(*leaves, vals)
    tensors = leaves + ([] if vals is None else [vals])
    got = torch.autograd.grad(out, tensors, grad, allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, got)]


def assert_close(got, want, tol=1e-10):
    for name, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


def compare(win, q, k, v, values, backend, tol=1e-10, **kwargs):
    grad = torch.randn_like(q)

    def ours(q, k, v, vals):
        bias = None if vals is None else sb.SparseBias(win, vals)
        return sb.window_attention(q, k, v, win, bias=bias, backend=backend,
                                   dropout_seed=kwargs.get("seed"), **{n: kwargs[n] for n in kwargs if n != "seed"})

    def ref(q, k, v, vals):
        bias = None if vals is None else sb.SparseBias(win, vals)
        return reference.window_attention(q, k, v, win, bias, dropout_seed=kwargs.get("seed", 0),
                                          **{n: kwargs[n] for n in kwargs if n != "seed"})

    assert_close(fwd_grads(ours, q, k, v, values, grad), fwd_grads(ref, q, k, v, values, grad), tol)


# ---- exactness, float64 ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [None, "shared", "per_head"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_the_reference(backend, bias, device):
    skip_missing(backend)
    win, q, k, v, values = case(bias=bias, device=device)
    compare(win, q, k, v, values, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_padding(backend):
    skip_missing(backend)
    win, q, k, v, values = case(bias="per_head")
    kpm = torch.rand(2, SMALL.num_keys, generator=torch.Generator().manual_seed(1)) < 0.3
    kpm[0, -5:] = True                                          # the end of the key range
    compare(win, q, k, v, values, backend, key_padding_mask=kpm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_matches_the_dense_reference_with_the_same_seed(backend):
    skip_missing(backend)
    win, q, k, v, values = case(bias="shared")
    kpm = torch.zeros(2, SMALL.num_keys, dtype=torch.bool)
    kpm[1, :6] = True
    compare(win, q, k, v, values, backend, dropout_p=0.3, seed=1234, key_padding_mask=kpm)


@given(layout=layouts(), batch=st.integers(1, 2), queries=st.integers(0, 6), slots=st.integers(1, 3),
       bev_window=odd_or_zero, cam_window=odd_or_zero, adaptive=st.booleans(), heads=st.integers(1, 3),
       bias=st.sampled_from([None, "shared", "per_head"]), backend=st.sampled_from(BACKENDS),
       seed=st.integers(0, 2**31))
def test_random_layouts_and_windows(layout, batch, queries, slots, bev_window, cam_window, adaptive, heads, bias,
                                    backend, seed):
    skip_missing(backend)
    gen = torch.Generator().manual_seed(seed)
    if adaptive:
        bev_window = 2 * torch.randint(0, 5, (batch, queries), generator=gen) + 1
        cam_window = 2 * torch.randint(0, 5, (batch, queries), generator=gen) + 1
        cam_window[torch.rand(batch, queries, generator=gen) < 0.3] = 0
    bev_pos, cam_pos = random_positions(layout, batch, queries, slots, gen)
    win = sb.local_windows(layout, bev_pos, cam_pos, bev_window, cam_window)
    nk = layout.num_keys
    q, k, v = (torch.randn(batch, heads, n, 4, generator=gen, dtype=torch.float64) for n in (queries, nk, nk))
    values = None
    if bias is not None:
        shape = (win.nnz,) if bias == "shared" else (win.nnz, heads)
        values = 4 * torch.rand(shape, generator=gen, dtype=torch.float64) - 2
    kpm = torch.rand(batch, nk, generator=gen) < 0.2
    compare(win, q, k, v, values, backend, key_padding_mask=kpm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_fully_padded_windows_give_zero_output_and_gradients(backend):
    skip_missing(backend)
    layout = sb.KeyLayout(bev_shape=(5, 5))
    bev_pos = torch.tensor([[[2, 2], [-1, -1], [0, 0]]])          # query 1: no window
    win = sb.local_windows(layout, bev_pos, None, bev_window=3)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 25, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 25, 4, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(1, 25, dtype=torch.bool)
    kpm[0, [0, 1, 5, 6]] = True                                    # query 2's whole (corner) window is padded
    out = sb.window_attention(q, k, v, win, key_padding_mask=kpm, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[:, :, 1:] == 0).all()
    dq, = torch.autograd.grad(out.sum(), q)
    assert (dq[:, :, 1:] == 0).all() and torch.isfinite(dq).all()


def test_no_window_at_all():
    layout = sb.KeyLayout(bev_shape=(4, 4))
    win = sb.local_windows(layout, torch.full((2, 3, 2), -1), None, bev_window=3)
    q = torch.randn(2, 1, 3, 4, requires_grad=True)
    k, v = torch.randn(2, 1, 16, 4, requires_grad=True), torch.randn(2, 1, 16, 4, requires_grad=True)
    out = sb.window_attention(q, k, v, win)
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all() and (k.grad == 0).all()


@pytest.mark.parametrize("backend", ["fused", "sparse", "scatter", "torch"])
def test_gradcheck(backend):
    skip_missing(backend)
    win, q, k, v, values = case(batch=1, heads=2, queries=3, dim=3, bias="per_head",
                                layout=sb.KeyLayout(bev_shape=(4, 4), cam_shape=(2, 3, 3)), bev_window=3)

    def fn(q, k, v, vals):
        return sb.window_attention(q, k, v, win, bias=sb.SparseBias(win, vals), backend=backend)

    leaves = [t.requires_grad_() for t in (q, k, v, values)]
    assert torch.autograd.gradcheck(fn, leaves)


def test_windows_at_the_borders_and_multi_view():
    layout = sb.KeyLayout(bev_shape=(6, 6), cam_shape=(3, 4, 5))
    bev_pos = torch.tensor([[[0, 0], [5, 5], [0, 5]]])
    cam_pos = torch.tensor([[[[0, 0, 0], [1, 3, 4]], [[2, 3, 4], [-1, 0, 0]], [[1, 0, 4], [2, 3, 0]]]])
    win = sb.local_windows(layout, bev_pos, cam_pos, bev_window=5, cam_window=3)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=gen, dtype=torch.float64) for n in (3, 96, 96))
    compare(win, q, k, v, None, "sparse")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_drift_bounded_by_a_same_precision_naive_version(dtype):
    skip_without_matmul(dtype)
    win, q, k, v, values = case(queries=40, dim=16, bias="shared")
    exact = reference.window_attention(q, k, v, win, sb.SparseBias(win, values))
    ours = sb.window_attention(q.to(dtype), k.to(dtype), v.to(dtype), win, bias=sb.SparseBias(win, values.to(dtype)))
    naive = sdpa_window(q.to(dtype), k.to(dtype), v.to(dtype), win, values.to(dtype))
    err, err_naive = ((x.double() - exact).abs().max() for x in (ours, naive))
    assert ours.dtype == dtype
    assert err <= 2 * err_naive + 1e-6


@pytest.mark.parametrize("backend", WINDOW_BACKENDS + ["dense"])
def test_inf_score_gives_nan_as_sdpa(backend):
    skip_missing(backend)
    win, q, k, v, wb, wc = make_case(SMALL, batch=1, heads=1, queries=3, dim=2, dtype=torch.float32)
    e0, e1 = int(win.indptr[0]), int(win.indptr[1])
    if e1 == e0:
        pytest.skip("query 0 has no window")
    q[0, 0, 0] = torch.tensor([3e38, 3e38])
    k[0, 0, win.key[e0]] = torch.tensor([3e38, 3e38])                         # the score overflows to +inf
    out = sb.window_attention(q, k, v, win, backend=backend)
    assert torch.isnan(out[0, 0, 0]).all()


def test_backend_selection():
    q = torch.zeros(1, 1, 1, 4)
    name, why = sb.select_window_backend(q)
    assert name == ("fused" if sb.extension_available() else "sparse") and "auto" in why
    assert sb.select_window_backend(q, "torch")[0] == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        sb.select_window_backend(q, "flash")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="backend 'triton' cannot run here"):
            sb.select_window_backend(q, "triton")


# ---- bad input ------------------------------------------------------------------------------------

def test_bad_inputs_name_the_argument():
    win, q, k, v, values = case(bias="shared")
    with pytest.raises(TypeError, match="win must be a WindowIndex"):
        sb.window_attention(q, k, v, win.to_dense_mask())
    other_batch, *_ = case(batch=1)
    with pytest.raises(ValueError, match=r"win is for \[B, Q\] = \[1, 7\]"):
        sb.window_attention(q, k, v, other_batch)
    other_layout, *_ = case(layout=sb.KeyLayout(bev_shape=(9, 11)))
    with pytest.raises(ValueError, match="win indexes a layout of 99 keys"):
        sb.window_attention(q, k, v, other_layout)
    with pytest.raises(ValueError, match="q .* and k .* disagree"):
        sb.window_attention(q[..., :4], k, v, win)
    nan = values.clone()
    nan[3] = float("nan")
    sb.set_debug_checks(True)                        # a device-value check: under the debug switch
    try:
        with pytest.raises(ValueError, match="bias.values contains NaN"):
            sb.window_attention(q, k, v, win, bias=sb.SparseBias(win, nan))
    finally:
        sb.set_debug_checks(False)
    assert torch.isnan(sb.window_attention(q, k, v, win, bias=sb.SparseBias(win, nan))).any()   # loud, not wrong
    other_win, *_ = case(seed=5)
    with pytest.raises(ValueError, match="another window index"):
        sb.window_attention(q, k, v, win, bias=sb.SparseBias(other_win, torch.zeros(other_win.nnz, dtype=q.dtype)))
    with pytest.raises(TypeError, match="bias must be a SparseBias"):
        sb.window_attention(q, k, v, win, bias=torch.zeros(2, 7, SMALL.num_keys))
    with pytest.raises(ValueError, match="key_padding_mask must be"):
        sb.window_attention(q, k, v, win, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        sb.window_attention(q, k, v, win, dropout_p=1.5)
