"""The fused Triton kernels against the dense reference, forward and backward, in float32 / bfloat16 / float16.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors): the interpreter
must be switched on before triton is imported, so ``test_kernels_under_the_interpreter`` runs this file
again in a subprocess with the variable set. With CUDA the kernels run on the GPU directly. Low-precision
results are held to the float64 reference within twice the drift of the dense computation in the same dtype.
"""
import os
import warnings

import pytest
import torch

import sparse_bias as sb
from sparse_bias._core import selfcheck
from sparse_bias.backends.triton import TRITON_AVAILABLE

from helpers import make_case, pytest_under_the_interpreter, reference, sparse_fn

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed (extra: triton)")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVE = INTERPRETED or torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"
active = pytest.mark.skipif(not ACTIVE, reason="runs in the interpreter subprocess of "
                                                "test_kernels_under_the_interpreter (or on CUDA)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the interpreted checks in a subprocess")
def test_kernels_under_the_interpreter():
    pytest_under_the_interpreter(__file__)


LAYOUT = sb.KeyLayout(bev_shape=(6, 7), cam_shape=(2, 4, 5))


def case(per_head, dim=16, seed=0):
    """A small case whose last query has no window and whose first query's camera window sits in the
    bottom-right corner of the last view -- the end of the key range."""
    win, q, k, v, wb, wc = make_case(LAYOUT, batch=2, heads=2, queries=5, dim=dim, per_head=per_head, seed=seed,
                                     bev_window=3, cam_window=3)
    bev = torch.tensor([[[1, 2], [5, 6], [0, 0], [3, 3], [-1, -1]]] * 2)
    cam = torch.tensor([[[1, 3, 4], [0, 0, 0], [1, 2, 2], [-1, 0, 0], [-1, 0, 0]]] * 2)
    win = sb.local_windows(LAYOUT, bev, cam, 3, 3)
    assert int(win.key.max()) == LAYOUT.num_keys - 1 and int(win.counts()[0, -1]) == 0
    return win.to(DEVICE), q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), wb.to(DEVICE), wc.to(DEVICE)


def results(fn, dtype, win, q, k, v, wb, wc, grad, **kwargs):
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v, wb, wc)]
    out = fn(*leaves[:3], sb.window_bias(win, leaves[3], leaves[4]), **kwargs)
    assert out.dtype == dtype
    return [out.detach().double()] + [g.double() for g in torch.autograd.grad(out, leaves, grad.to(dtype))]


def assert_within_drift(exact, naive, fast, dtype):
    """Each result within twice the drift of the dense computation in the same dtype from the float64 one. The
    drift of a tensor is at least one rounding step of its largest element (``eps * max|exact|``): a result
    stored in ``dtype`` cannot be closer, and a lucky naive computation must not make the bar unreachable."""
    eps = torch.finfo(dtype).eps
    for name, e, n, f in zip(["out", "dq", "dk", "dv", "dwb", "dwc"], exact, naive, fast):
        size = float(e.abs().max())
        drift = max(float((n - e).abs().max()), eps * size)
        err = float((f - e).abs().max())
        assert err <= 2 * drift + 1e-5 * size, (name, err, drift)


def padding():
    kpm = torch.zeros(2, LAYOUT.num_keys, dtype=torch.bool, device=DEVICE)
    kpm[0, 3:9] = True
    kpm[1, -4:] = True                                   # padded keys at the end of the range
    return kpm


@active
@pytest.mark.parametrize("dim", [16, 32, 64, 24])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_dense_reference(dtype, dim):
    """Per-head bias, key padding: output and every gradient within twice the same-precision dense drift."""
    win, q, k, v, wb, wc = case(per_head=True, dim=dim)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    kw = dict(key_padding_mask=padding())
    exact = results(reference, torch.float64, win, q, k, v, wb, wc, grad, **kw)
    naive = results(reference, dtype, win, q, k, v, wb, wc, grad, **kw)
    fast = results(sparse_fn("triton"), dtype, win, q, k, v, wb, wc, grad, **kw)
    assert_within_drift(exact, naive, fast, dtype)


@active
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_triton_float32_shared_and_per_head(per_head, masks):
    win, q, k, v, wb, wc = case(per_head=per_head, seed=2)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEVICE)
    kw = dict(key_padding_mask=padding()) if masks else {}
    got = results(sparse_fn("triton"), torch.float32, win, q, k, v, wb, wc, grad, **kw)
    want = results(reference, torch.float32, win, q, k, v, wb, wc, grad, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@active
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dropout_matches_reference(dtype):
    win, q, k, v, wb, wc = case(per_head=True, seed=3)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    kw = dict(dropout_p=0.25, dropout_seed=11)
    exact = results(reference, torch.float64, win, q, k, v, wb, wc, grad, **kw)
    naive = results(reference, dtype, win, q, k, v, wb, wc, grad, **kw)
    fast = results(sparse_fn("triton"), dtype, win, q, k, v, wb, wc, grad, **kw)
    assert_within_drift(exact, naive, fast, dtype)


@active
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_passes_its_self_check(dtype):
    selfcheck.reset_self_checks()
    assert selfcheck.self_check("triton", torch.device(DEVICE), dtype, 24) == (True, "matches the dense reference")


@active
@pytest.mark.parametrize("dtype", DTYPES)
def test_item03_triton_with_module_layouts(dtype):
    """q permuted from the projection's [B, Q, H, D] (the dense output is then strided), k with a
    strided last dim and a permuted output gradient: the correction is added through the output's own strides."""
    win, q, k, v, wb, wc = case(per_head=True, seed=6)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)

    def permuted(fn):
        def run(q_, k_, v_, bias, **kw):
            q_ = q_.transpose(1, 2).contiguous().transpose(1, 2)
            k_ = k_.transpose(-1, -2).contiguous().transpose(-1, -2)
            out = fn(q_, k_, v_, bias, **kw)
            return out
        return run

    exact = results(reference, torch.float64, win, q, k, v, wb, wc, grad)
    naive = results(reference, dtype, win, q, k, v, wb, wc, grad)
    fast = results(permuted(sparse_fn("triton")), dtype, win, q, k, v, wb, wc,
                   grad.transpose(1, 2).contiguous().transpose(1, 2))
    assert_within_drift(exact, naive, fast, dtype)


@active
def test_item03_triton_module_matches_dense():
    """`SparseBiasMultiheadAttention(backend="triton")` against the same module on "dense"."""
    torch.manual_seed(0)
    win, q, k, v, wb, wc = case(per_head=False, seed=8)
    bias = sb.window_bias(win, wb.float(), wc.float())
    module = sb.nn.SparseBiasMultiheadAttention(16, 2, backend="triton").to(DEVICE)
    x = torch.randn(win.num_queries, 2, 16, device=DEVICE)
    mem = torch.randn(LAYOUT.num_keys, 2, 16, device=DEVICE)
    out = module(x, mem, mem, attention_bias=bias)
    module.backend = "dense"
    ref = module(x, mem, mem, attention_bias=bias)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


class _Corrupted:
    """A faulty forward kernel: runs the real one, then adds 1 to its output (argument ``out_index``)."""

    def __init__(self, kernel, out_index=12):
        self.kernel, self.out_index = kernel, out_index

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.kernel[grid](*args, **kwargs)
            args[self.out_index].add_(1.0)
        return launch


@active
def test_faulty_triton_kernel_is_caught_and_skipped(monkeypatch):
    from sparse_bias.backends.triton import correction_kernels as kern
    monkeypatch.setattr(kern, "correction_forward_kernel", _Corrupted(kern.correction_forward_kernel))
    monkeypatch.setitem(sb.backends.AUTO_ORDER, DEVICE, ("triton", "sparse", "torch"))
    selfcheck.reset_self_checks()
    win, q, k, v, wb, wc = case(per_head=True, seed=5)
    q, k, v = q.float(), k.float(), v.float()
    bias = sb.window_bias(win, wb.float(), wc.float())
    with pytest.warns(RuntimeWarning, match="backend 'triton' disagrees with the dense reference"):
        name, why = sb.select_backend(q, bias)
    assert name == "sparse"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # the failure is remembered: no second check, no warning
        assert sb.select_backend(q, bias, backend="triton")[0] == "sparse"
        out = sb.sparse_bias_attention(q, k, v, bias, backend="triton")
    torch.testing.assert_close(out, sb.dense_bias_attention(q, k, v, bias.to_dense()), rtol=2e-5, atol=2e-6)
    selfcheck.reset_self_checks()


def test_triton_backend_reports_why_it_cannot_run():
    ok, why = sb.backends.BACKENDS["triton"].can_run(torch.device("cpu"), torch.float64)
    assert not ok and ("float32" in why or "TRITON_INTERPRET" in why)


# ---- the dense pass with dropout (sparse_bias.backends.triton.dense) -----------------------------------------

def dense_problem(dim, nq=45, nk=77, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, nq, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, nk, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    g = torch.randn(2, 2, nq, dim, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 1, 1, nk, dtype=torch.float64)
    mask[1, ..., -10:] = float("-inf")                   # padded keys at the end of the range
    return [t.to(DEVICE) for t in (q, k, v, g, mask)]


@active
@pytest.mark.parametrize("dim", [16, 64, 24])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dense_dropout_matches_the_chunked_kernel(dtype, dim):
    """Same keep decisions as the reference (a key range and a seed above 2^32 included); output, log-sum-exp and
    gradients within twice the drift of the chunked kernel run in the same dtype."""
    import dataclasses
    from sparse_bias._core.call import Call
    from sparse_bias.backends.triton import dense as triton_dense
    from sparse_bias.dense import chunked, kernel_lse
    q, k, v, g, mask = dense_problem(dim)

    def chunked_bwd(gg, inputs, outputs, call):
        return chunked.chunked_backward(gg, *inputs, outputs[0], kernel_lse(outputs[1]), call)

    def run(fn, bwd, dt):
        qq, kk, vv, gg = (t.to(dt) for t in (q, k, v, g))
        call = dataclasses.replace(Call.of(qq, 0.3, mask, 0.25, (1 << 40) + 9), key_range=(5, k.shape[2] + 11))
        out, lse = fn(qq, kk, vv, call)
        return [out, lse] + list(bwd(gg, (qq, kk, vv), (out, lse), call))

    exact = run(chunked.chunked_forward, chunked_bwd, torch.float64)
    naive = run(chunked.chunked_forward, chunked_bwd, dtype)
    fast = run(triton_dense.dense_forward, triton_dense.dense_backward, dtype)
    assert fast[0].dtype == dtype and fast[1].dtype == torch.float32
    eps = torch.finfo(dtype).eps
    for name, e, n, f in zip(["out", "lse", "dq", "dk", "dv"], exact, naive, fast):
        e, n, f = (t.double().nan_to_num() for t in (e, n, f))
        size = float(e.abs().max())
        drift = max(float((n - e).abs().max()), eps * size)
        assert float((f - e).abs().max()) <= 2 * drift + 1e-5 * size, name


@active
def test_sparse_bias_attention_with_dropout_on_the_triton_dense_pass(monkeypatch):
    from sparse_bias.dense import lse as dense_lse
    original = dense_lse.dense_kernel_name
    monkeypatch.setattr(dense_lse, "dense_kernel_name",
                        lambda q, call, num_keys=1: "triton_dropout" if call.dropout_p > 0 else original(q, call, num_keys))
    win, q, k, v, wb, wc = case(per_head=True, seed=6)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    kw = dict(dropout_p=0.2, dropout_seed=123, key_padding_mask=padding())
    got = results(sparse_fn("triton"), torch.float32, win, q, k, v, wb, wc, grad, **kw)
    want = results(reference, torch.float32, win, q, k, v, wb, wc, grad, **kw)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@active
def test_triton_dense_kernel_is_checked_before_first_use(monkeypatch):
    from sparse_bias.backends.triton import dense_kernels as kern
    from sparse_bias.dense import lse as dense_lse
    selfcheck.reset_self_checks()
    q = torch.zeros(1, 2, 5, 16, device=DEVICE)
    assert dense_lse._checked("triton_dropout", q)
    monkeypatch.setattr(kern, "dense_forward_kernel", _Corrupted(kern.dense_forward_kernel, out_index=4))
    with pytest.warns(RuntimeWarning, match="dense kernel triton_dropout disagrees"):
        assert not dense_lse._checked("triton_dropout", q.half())
    selfcheck.reset_self_checks()
