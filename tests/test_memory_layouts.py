"""The memory layouts users' tensors come in, exact on every backend: k viewed from a ``[B, C, N]`` feature map
(last-dim stride N), a head dim of 1 with stride 2. The randomised layouts of every entry point are in
test_differential.py, the Triton kernels' in test_triton.py."""
import pytest
import torch
from helpers import CORRECTION_BACKENDS, SMALL, make_case, skip_missing

import reference
import sparse_bias as sb

BACKENDS = ["auto"] + CORRECTION_BACKENDS + ["dense"]


def outputs_and_grads(fn, leaves, grad):
    """``[out, d leaf...]`` of ``fn(*leaves)`` (None for a leaf it does not use)."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad, allow_unused=True))


def close(got, want, tol=1e-9):
    """Finite and equal within ``tol`` (a missing gradient counts as zeros)."""
    for i, (a, b) in enumerate(zip(got, want)):
        a = torch.zeros_like(b) if a is None else a
        assert torch.isfinite(a).all(), f"tensor {i} holds NaN / inf"
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=lambda m: f"tensor {i}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_last_dim_is_exact(backend):
    skip_missing(backend)
    win, q, k, v, wb, wc = make_case(SMALL, batch=2, heads=2, queries=6, dim=4, per_head=True)
    bsz, heads, nk, dim = k.shape
    fmap = torch.randn(bsz, heads * dim, nk, dtype=torch.float64)           # a [B, C, H*W] feature map
    k = fmap.view(bsz, heads, dim, nk).transpose(-1, -2)                     # [B, H, K, D], last-dim stride K
    assert k.stride(-1) != 1
    bias = sb.window_bias(win, wb, wc)
    grad = torch.randn(q.shape, dtype=torch.float64)
    for b in (None, bias):
        dense = None if b is None else reference.dense_from_entries(win, b.values.detach())
        got = outputs_and_grads(lambda q_, k_, v_: sb.sparse_bias_attention(q_, k_, v_, b, backend=backend),
                                (q, k, v), grad)
        want = outputs_and_grads(lambda q_, k_, v_: reference.attention(q_, k_, v_, dense), (q, k, v), grad)
        close(got, want)


def test_head_dim_one_with_stride_two():
    win, q, k, v, wb, wc = make_case(SMALL, batch=1, heads=2, queries=4, dim=1)
    nk = SMALL.num_keys
    k2 = torch.empty_strided((1, 2, nk, 1), (2 * nk, nk, 1, 2), dtype=torch.float64)   # D = 1 of stride 2
    k2.copy_(torch.randn(1, 2, nk, 1, dtype=torch.float64))
    assert k2.is_contiguous() and k2.stride(-1) == 2
    bias = sb.window_bias(win, wb, wc)
    for backend in ("auto", "sparse", "torch"):
        out = sb.sparse_bias_attention(q, k2, v, bias, backend=backend)
        close([out], [reference.attention(q, k2, v, reference.dense_from_entries(win, bias.values.detach()))])
        out = sb.window_attention(q, k2, v, win, backend=backend)
        close([out], [reference.window_attention(q, k2, v, win)])
