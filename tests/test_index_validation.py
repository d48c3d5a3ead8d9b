"""WindowIndex validation (once per index object), int32 window offsets, signed positions, and the
deterministic gradient of the per-query weights through window_bias."""
import math

import pytest
import torch
from helpers import profile_names, random_positions
from torch.utils._python_dispatch import TorchDispatchMode

import sparse_bias as sb
from sparse_bias.bias import _segment_expand

K16 = sb.KeyLayout(bev_shape=(2, 4), cam_shape=(2, 2, 2))          # 8 BEV keys + 8 camera keys = 16


class OpLog(TorchDispatchMode):
    """Records every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2", "masked_select", "tolist"}


def hand_made(indptr=(0, 3, 5, 5), key=(0, 1, 9, 5, 12), source=None, batch=1, queries=3, layout=K16,
              dtype=torch.long):
    """B=1, Q=3: query 0 has keys 0, 1 (BEV) and 9 (camera), query 1 has 5 (BEV) and 12 (camera), query 2 none."""
    key = torch.tensor(key, dtype=dtype)
    if source is None:
        source = (key >= layout.num_bev_keys).to(torch.int8)
    else:
        source = torch.tensor(source, dtype=torch.int8)
    zeros = torch.zeros(key.numel(), dtype=torch.int32)
    return sb.WindowIndex(layout, batch, queries, torch.tensor(indptr, dtype=dtype), key, source, zeros,
                          zeros.clone())


# -- index validation once per index object ------------------------------------------------------------------

def test_index_validation_accepts_a_valid_hand_made_index():
    win = hand_made()
    assert "validated" not in win._cache
    assert win.validate() is win
    assert win._cache["validated"] is True


@pytest.mark.parametrize("bad", [17, -3, 10 ** 7, 16])
def test_index_validation_rejects_keys_out_of_range(bad):
    win = hand_made(key=(0, 1, 9, 5, bad), source=(0, 0, 1, 0, 1))
    with pytest.raises(ValueError, match=rf"key\[4\] = {bad} \(query \(0, 1\)\) is out of range \[0, 16\)"):
        win.validate()
    assert "validated" not in win._cache             # a failed validation is not cached


@pytest.mark.parametrize("indptr, match", [
    ((0, 3, 2, 5), r"indptr must be non-decreasing, got indptr\[1\] = 3 > indptr\[2\] = 2"),
    ((1, 3, 5, 5), r"indptr\[0\] must be 0, got 1"),
    ((0, 3, 5, 7), r"indptr\[-1\] must equal nnz = key.numel\(\) = 5, got 7"),
    ((0, 3, 5, 4), r"indptr must be non-decreasing, got indptr\[2\] = 5 > indptr\[3\] = 4"),
    ((0, 1, 2, 3), r"indptr\[-1\] must equal nnz = key.numel\(\) = 5, got 3"),
])
def test_index_validation_rejects_bad_indptr_values(indptr, match):
    with pytest.raises(ValueError, match=match):
        hand_made(indptr=indptr).validate()


def test_index_validation_rejects_oversized_indptr_at_construction():
    with pytest.raises(ValueError, match=r"indptr must have B \* Q \+ 1 = 4 elements .* got 5"):
        hand_made(indptr=(0, 3, 5, 5, 5))
    with pytest.raises(ValueError, match=r"indptr must have B \* Q \+ 1 = 4 elements .* got 3"):
        hand_made(indptr=(0, 3, 5))


@pytest.mark.parametrize("which", ["indptr", "key"])
def test_index_validation_rejects_int32_indptr_and_key(which):
    win = hand_made()
    parts = dict(indptr=win.indptr, key=win.key)
    parts[which] = parts[which].int()
    with pytest.raises(TypeError, match=rf"{which} must be an int64 \(torch.long\) tensor, got dtype torch.int32; "
                                        rf"use {which}.long\(\)"):
        sb.WindowIndex(K16, 1, 3, parts["indptr"], parts["key"], win.source, win.dy, win.dx)


@pytest.mark.parametrize("key, match", [
    ((0, 1, 1, 5, 12), r"key must ascend and be unique within each query; query \(0, 0\) repeats key 1 "
                       r"\(entries 1 and 2\)"),
    ((1, 0, 9, 5, 12), r"key must ascend and be unique within each query; query \(0, 0\) has key 0 after key 1"),
    ((0, 1, 9, 12, 12), r"query \(0, 1\) repeats key 12"),
])
def test_index_validation_rejects_duplicate_and_unsorted_keys(key, match):
    with pytest.raises(ValueError, match=match):
        hand_made(key=key).validate()


def test_index_validation_rejects_bad_sources():
    with pytest.raises(ValueError, match=r"source must be 0 \(BEV\) or 1 \(camera\), got source\[2\] = 2"):
        hand_made(source=(0, 0, 2, 0, 1)).validate()
    with pytest.raises(ValueError, match=r"source\[1\] = 1 but key\[1\] = 1 is a BEV key"):
        hand_made(source=(0, 1, 1, 0, 1)).validate()


@pytest.mark.parametrize("change, exc, match", [
    (lambda a: a.update(layout=(2, 4)), TypeError, "layout must be a KeyLayout"),
    (lambda a: a.update(batch_size=-1), ValueError, "batch_size must be >= 0"),
    (lambda a: a.update(num_queries=3.0), TypeError, "num_queries must be an int"),
    (lambda a: a.update(indptr=a["indptr"].view(1, 4)), ValueError, r"indptr must be 1-D"),
    (lambda a: a.update(key=a["key"].tolist()), TypeError, "key must be a torch.Tensor"),
    (lambda a: a.update(source=a["source"][:4]), ValueError, r"source must have one element per key entry"),
    (lambda a: a.update(dy=a["dy"][:4]), ValueError, r"dy must have one element per key entry"),
    (lambda a: a.update(dx=a["dx"].float()), TypeError, r"dx must be an integer tensor"),
    (lambda a: a.update(source=a["source"].to("meta")), ValueError, r"source is on meta but key is on cpu"),
    (lambda a: a.update(indptr=a["indptr"].to("meta")), ValueError, r"indptr is on meta but key is on cpu"),
])
def test_index_validation_metadata_checks_at_construction(change, exc, match):
    win = hand_made()
    args = dict(layout=K16, batch_size=1, num_queries=3, indptr=win.indptr, key=win.key, source=win.source,
                dy=win.dy, dx=win.dx)
    change(args)
    with pytest.raises(exc, match=match):
        sb.WindowIndex(**args)


def test_index_validation_runs_once_per_object():
    win = hand_made()
    with OpLog() as first:
        win.validate()
    assert first.ops                                     # the first call reads the values
    with OpLog() as second:
        assert win.validate() is win
    assert second.ops == []                              # later calls touch no tensor


def test_index_validation_local_windows_come_out_validated():
    gen = torch.Generator().manual_seed(0)
    layout = sb.KeyLayout(bev_shape=(20, 20), cam_shape=(3, 8, 10))
    bev_pos, cam_pos = random_positions(layout, 2, 30, 2, gen)
    win = sb.local_windows(layout, bev_pos, cam_pos, 5, 3)
    with OpLog() as log:
        win.validate()
    assert log.ops == []
    # ... and would pass a real validation: the flag is truthful.
    fresh = sb.WindowIndex(layout, win.batch_size, win.num_queries, win.indptr, win.key, win.source, win.dy, win.dx)
    fresh.validate()
    # Copies carry the flag (same values); the cached structures stay behind.
    moved = win.to("meta")
    assert moved is not win and moved._cache == {"validated": True}
    with OpLog() as log:
        moved.validate()
    assert log.ops == []
    assert hand_made().to("meta")._cache == {}          # not validated -> not marked


def test_index_validation_empty_index():
    win = sb.WindowIndex(K16, 2, 0, torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long),
                         torch.zeros(0, dtype=torch.int8), torch.zeros(0, dtype=torch.int32),
                         torch.zeros(0, dtype=torch.int32))
    assert win.validate()._cache["validated"]
    win = hand_made(indptr=(0, 0, 0, 0), key=())
    assert win.validate()._cache["validated"]


def test_index_validation_window_bias_validates_hand_made_indexes():
    win = hand_made(key=(0, 1, 1, 5, 12))
    with pytest.raises(ValueError, match="repeats key 1"):
        sb.window_bias(win, torch.ones(1, 3), torch.ones(1, 3))


# -- dy / dx do not wrap --------------------------------------------------------------------------------------

def test_dy_dx_wrap_gaussian_on_a_wide_grid():
    layout = sb.KeyLayout(bev_shape=(1, 40000))
    centres = [0, 39999, 20000]
    bev_pos = torch.tensor([[[0, c] for c in centres]])
    win = sb.local_windows(layout, bev_pos, bev_window=80001)
    assert win.dy.dtype == win.dx.dtype == torch.int32
    assert win.nnz == 3 * 40000
    centre = torch.tensor(centres)[win.row]
    assert torch.equal(win.dx.long(), win.key - centre)             # the true offsets, up to +-39999
    assert not win.dy.any()
    bias = sb.window_bias(win, torch.ones(1, 3, dtype=torch.float64), profile="gaussian")
    sigma = (80001 // 2) / 2                                           # half the half-size: 20000 cells
    dx = (win.key - centre).double()
    expected = torch.exp(-(dx ** 2) / (2 * sigma ** 2))
    torch.testing.assert_close(bias.values, expected, rtol=1e-12, atol=0)
    far = bias.values[win.key == 39999][0]                            # far end of the first window
    assert abs(float(far) - math.exp(-39999 ** 2 / (2 * sigma ** 2))) < 1e-12
    assert abs(float(far) - math.exp(-2)) < 1e-4
    # Half-precision weights: the falloff is computed in fp32 (squared offsets overflow fp16).
    half = sb.window_bias(win, torch.ones(1, 3, dtype=torch.float16), profile="gaussian")
    assert half.values.dtype == torch.float16
    torch.testing.assert_close(half.values.double(), expected, rtol=1e-3, atol=1e-3)
    assert win.nbytes() == win.nnz * (8 + 1 + 4 + 4) + 8 * (win.num_rows + 1)


# -- positions and window sizes must be signed ----------------------------------------------------------------

def test_unsigned_positions_are_refused():
    layout = sb.KeyLayout(bev_shape=(20, 20), cam_shape=(3, 8, 10))
    bev_pos = torch.tensor([[[3, 4], [-1, 0]]])
    cam_pos = torch.tensor([[[1, 2, 3], [-1, 0, 0]]])
    with pytest.raises(TypeError, match=r"bev_pos must have a signed integer dtype .* got dtype torch.uint8"):
        sb.local_windows(layout, bev_pos.to(torch.uint8), cam_pos)
    with pytest.raises(TypeError, match=r"cam_pos must have a signed integer dtype .* got dtype torch.uint8"):
        sb.local_windows(layout, bev_pos, cam_pos.to(torch.uint8))
    with pytest.raises(TypeError, match=r"bev_window must have a signed integer dtype"):
        sb.local_windows(layout, bev_pos, cam_pos, bev_window=torch.full((1, 2), 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"cam_window must have a signed integer dtype"):
        sb.local_windows(layout, bev_pos, cam_pos, cam_window=torch.full((1, 2), 3, dtype=torch.uint8))
    ref = sb.local_windows(layout, bev_pos, cam_pos, 5, 3)
    for dtype in (torch.int8, torch.int16, torch.int32):                # every signed dtype still works
        win = sb.local_windows(layout, bev_pos.to(dtype), cam_pos.to(dtype), torch.full((1, 2), 5, dtype=dtype), 3)
        assert torch.equal(win.key, ref.key) and torch.equal(win.indptr, ref.indptr)


# -- deterministic gradients of the AQR weights --------------------------------------------------------------

def _cmt_scene(batch=2, queries=900, seed=0):
    layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100))
    gen = torch.Generator().manual_seed(seed)
    bev_pos, cam_pos = random_positions(layout, batch, queries, 2, gen)
    win = sb.local_windows(layout, bev_pos, cam_pos, 15, 15)
    bev_weight = torch.randn(batch, queries, 8, generator=gen)             # per head
    cam_weight = torch.randn(batch, queries, generator=gen)                # shared by the heads
    return win, bev_weight, cam_weight


def _grads(win, bev_weight, cam_weight):
    wb = bev_weight.clone().requires_grad_()
    wc = cam_weight.clone().requires_grad_()
    bias = sb.window_bias(win, wb, wc, scale=0.7, profile="gaussian")
    (bias.values ** 2).sum().backward()
    return wb.grad, wc.grad


def _old_grads(win, bev_weight, cam_weight):
    """The previous implementation: advanced indexing (backward = index_put accumulate)."""
    wb = bev_weight.clone().requires_grad_()
    wc = cam_weight.clone().requires_grad_()
    stacked = torch.stack([wb, wc.unsqueeze(-1).expand_as(wb)], dim=2).reshape(-1, wb.shape[-1])
    values = stacked[win.row * 2 + win.source.long()]
    sig = win.half_size().clamp(min=1).float() / 2
    falloff = torch.exp(-(win.dy.float() ** 2 + win.dx.float() ** 2) / (2 * sig * sig))
    ((values * falloff.unsqueeze(-1) * 0.7) ** 2).sum().backward()
    return wb.grad, wc.grad


def test_deterministic_gradients_of_the_weights():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        win, bev_weight, cam_weight = _cmt_scene()
        first = _grads(win, bev_weight, cam_weight)
        for _ in range(19):
            again = _grads(win, bev_weight, cam_weight)
            assert all(torch.equal(a, b) for a, b in zip(first, again))
        old = _old_grads(win, bev_weight, cam_weight)
        for got, want in zip(first, old):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.set_num_threads(1)                                          # and for another thread count
        assert all(torch.equal(a, b) for a, b in zip(first, _grads(win, bev_weight, cam_weight)))
    finally:
        torch.set_num_threads(threads)


def gradcheck_scene():
    """A small index with missing windows, per-head BEV and shared camera weights and a scale (float64, requiring
    gradients), and the generator they came from."""
    gen = torch.Generator().manual_seed(3)
    layout = sb.KeyLayout(bev_shape=(5, 6), cam_shape=(2, 3, 4))
    bev_pos, cam_pos = random_positions(layout, 2, 3, 2, gen, p_missing=0.3)
    win = sb.local_windows(layout, bev_pos, cam_pos, 3, 3)
    wb = torch.randn(2, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    wc = torch.randn(2, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    scale = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    return gen, win, wb, wc, scale


def check_weight_gradients(profile):
    """gradcheck of window_bias's values in the weights (per-head and shared) and the scale, under ``profile``."""
    _, win, wb, wc, scale = gradcheck_scene()
    assert torch.autograd.gradcheck(
        lambda a, b, s: sb.window_bias(win, a, b, scale=s, profile=profile).values, (wb, wc, scale))
    assert torch.autograd.gradcheck(
        lambda a, b: sb.window_bias(win, a, b, profile=profile).values, (wb[..., 0].detach().requires_grad_(), wc))


def test_deterministic_gradients_gradcheck_float64():
    gen, win, wb, wc, scale = gradcheck_scene()
    for profile in profile_names():
        check_weight_gradients(profile)
    # the expand itself, with empty segments (queries with no window) and a trailing head dim
    src = torch.randn(win.num_rows * 2, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: _segment_expand(s, win), (src,))
    assert torch.autograd.gradgradcheck(lambda s: _segment_expand(s, win), (src,))


def test_deterministic_gradients_need_no_host_sync():
    win, bev_weight, cam_weight = _cmt_scene(batch=1, queries=50)
    src = torch.randn(win.num_rows * 2, 8, requires_grad=True)
    with OpLog() as log:                                                  # first call: segments computed
        out = _segment_expand(src, win)
        out.backward(torch.ones_like(out))
    assert not SYNC_OPS & set(log.ops), log.ops
    assert "modality_segments" in win._cache
    with OpLog() as log:                                                  # cached: gather + segment sum only
        out = _segment_expand(src, win)
        out.backward(torch.ones_like(out))
    assert not SYNC_OPS & set(log.ops), log.ops
    assert "searchsorted" not in log.ops
    seg, offsets = win.modality_segments()
    assert offsets.shape == (win.num_rows * 2 + 1,)
    assert torch.equal(offsets[1:] - offsets[:-1], torch.bincount(seg, minlength=win.num_rows * 2))
