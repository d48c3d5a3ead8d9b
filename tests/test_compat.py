"""The fallbacks of `sparse_bias._core.compat` and the other feature probes, forced on the pinned torch: what a torch
without the feature runs (docs/install.md, "Support matrix") gives the same results as the feature's path."""
import math
import sys

import pytest
import torch

import sparse_bias as sb
from sparse_bias import windows
from sparse_bias._core import compat as _compat, correction, dispatch, modality, ops as _ops, window
from sparse_bias.dense import lse as dense_lse

from helpers import SMALL, make_case


def grads_of(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, g))


@pytest.mark.parametrize("op", ["sparse", "window", "modality"])
def test_unregistered_ops_equal_the_registered_ops(monkeypatch, op):
    """Without torch.library.custom_op the autograd Functions call the ops' implementations directly
    (`sparse_bias._core.compat.custom_op` leaves them unregistered): the same values and gradients."""
    win, q, k, v, wb, wc = make_case(SMALL, per_head=True, seed=4)
    values = sb.window_bias(win, wb, wc).values

    if op == "modality":
        values = torch.randn(q.shape[0], q.shape[2], 2, q.shape[1], dtype=q.dtype)

    def fn(q, k, v, values):
        if op == "modality":
            return sb.sparse_bias_attention(q, k, v, sb.ModalityBias(win.layout, values))
        bias = sb.SparseBias(win, values)
        if op == "sparse":
            return sb.sparse_bias_attention(q, k, v, bias, backend="sparse")
        return sb.window_attention(q, k, v, win, bias, backend="sparse")

    want = grads_of(fn, (q, k, v, values))
    monkeypatch.setattr(_ops, "custom_op", lambda name, mutates_args=(): _compat._Unregistered)   # torch < 2.4
    for name, math in (("sparse", correction), ("window", window), ("modality", modality)):
        for step in ("forward", "backward"):
            unregistered = _ops.Op(f"unregistered_{name}_{step}", getattr(math, step))
            assert isinstance(unregistered.registered, _compat._Unregistered)
            monkeypatch.setattr(_ops, f"_{name}_{step}", unregistered)
    got = grads_of(fn, (q, k, v, values))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_select_backend_says_compile_cannot_trace_without_custom_ops(monkeypatch):
    win, q, *_ = make_case(SMALL)
    bias = sb.SparseBias(win, torch.ones(win.nnz, dtype=q.dtype))
    assert "cannot trace" not in sb.select_backend(q, bias)[1] or not _compat.CUSTOM_OPS
    monkeypatch.setattr(dispatch, "CUSTOM_OPS", False)
    for _, why in (sb.select_backend(q, bias), sb.select_window_backend(q)):
        assert "no torch.library.custom_op" in why and "torch.compile cannot trace" in why, why


def test_dense_pass_without_the_cpu_flash_op(monkeypatch):
    """Without the CPU flash op the chunked kernel runs the dense pass: the same attention."""
    win, q, k, v, wb, wc = make_case(SMALL, seed=5)

    def fn(q, k, v, wb, wc):
        return sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc), backend="sparse")

    want = grads_of(fn, (q, k, v, wb, wc))
    monkeypatch.setattr(dense_lse, "_has_op", lambda name: False)
    from sparse_bias._core.call import Call
    assert dense_lse.dense_kernel_name(q, Call.of(q, 1.0)) == "chunked"
    got = grads_of(fn, (q, k, v, wb, wc))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_has_op_needs_the_scale_argument():
    assert not dense_lse._has_op("no_such_op_anywhere")
    assert not dense_lse._has_op("add")                   # exists, but takes no scale
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None:
        assert dense_lse._has_op("_scaled_dot_product_flash_attention_for_cpu")


def test_empty_windows_without_segment_reduce_on_empty_data():
    """No window entries at all (every query outside every window): zeros, no call of segment_reduce on empty data."""
    layout = sb.KeyLayout(bev_shape=(4, 4))
    win = sb.local_windows(layout, torch.full((2, 3, 2), -1), None, 3)
    assert win.nnz == 0
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 8, generator=gen, dtype=torch.float64) for n in (3, 16, 16))
    wb = torch.rand(2, 3, dtype=torch.float64)
    for backend in ("sparse", "torch"):
        got = grads_of(lambda q, k, v, wb: sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, None),
                                                                     backend=backend), (q, k, v, wb))
        want = grads_of(lambda q, k, v, wb: sb.dense_bias_attention(q, k, v, sb.window_bias(win, wb, None)
                                                                    .to_dense()), (q, k, v, wb))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mark_dynamic_without_maybe_mark_dynamic(monkeypatch):
    """A dynamo without ``maybe_mark_dynamic`` (torch 2.0): indexes are built unmarked, nothing fails."""
    fake = type(sys)("torch._dynamo")
    monkeypatch.setitem(sys.modules, "torch._dynamo", fake)
    monkeypatch.setattr(windows, "is_compiling", lambda: False)
    win = sb.local_windows(sb.KeyLayout(bev_shape=(4, 4)), torch.tensor([[[1, 1]]]), None, 3)
    assert win.nnz == 9


def test_is_compiling_without_torch_compiler(monkeypatch):
    """torch 2.0..2.2: ``torch._dynamo``'s flag when dynamo is imported, else False (never an import of it)."""
    monkeypatch.setattr(_compat, "_IS_COMPILING", None)
    monkeypatch.delitem(sys.modules, "torch._dynamo", raising=False)
    assert _compat.is_compiling() is False and "torch._dynamo" not in sys.modules
    fake = type(sys)("torch._dynamo")
    fake.is_compiling = lambda: True
    monkeypatch.setitem(sys.modules, "torch._dynamo", fake)
    assert _compat.is_compiling() is True


def test_unregistered_op_is_the_function():
    def f(x):
        return x + 1
    op = _compat._Unregistered(f)
    assert op(1) == 2 and op.__name__ == "f" and op.register_fake(math.sqrt) is math.sqrt
