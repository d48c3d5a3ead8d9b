"""Attention dropout on the fused CPU dense pass (sparse_bias/csrc/dense_dropout.cpp): the same counter-hash
decisions as the reference (tests/reference.py), exact gradients, the keep rate, repeatability, the fallback and the
modules."""
import dataclasses
import math

import pytest
import torch

import sparse_bias as sb
from sparse_bias._core.call import Call
from sparse_bias.dense import chunked, kernel_lse, lse as dense_lse

import reference
from helpers import (SMALL, assert_all_close, forward_and_grads, make_case, skip_missing, skip_without_matmul,
                     sparse_fn)

pytestmark = pytest.mark.skipif(not sb.extension_available(), reason="the compiled extension is not built")


def problem(nq=300, nk=1100, dim=16, dtype=torch.float64, seed=0):
    """Sizes that cross the kernel's query (256) and key (512) block borders."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, nq, dim, generator=gen, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(2, 3, nk, dim, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    g = torch.randn(2, 3, nq, dim, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v, g


def padding_mask(nk, dtype=torch.float64):
    mask = torch.zeros(2, 1, 1, nk, dtype=dtype)
    mask[1, ..., -150:] = float("-inf")
    return mask


def test_dropout_picks_the_compiled_kernel_and_falls_back_without_it(monkeypatch):
    q = torch.zeros(1, 1, 2, 8)
    assert dense_lse.dense_kernel_name(q, Call.of(q, 1.0, None, 0.1)) == "cpu_dropout"
    flash = dense_lse._has_op("_scaled_dot_product_flash_attention_for_cpu")
    assert dense_lse.dense_kernel_name(q, Call.of(q, 1.0)) == ("cpu_flash" if flash else "chunked")
    monkeypatch.setattr(dense_lse, "extension", lambda: (None, "not built"))
    assert dense_lse.dense_kernel_name(q, Call.of(q, 1.0, None, 0.1)) == "chunked"


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_compiled_dense_pass_equals_the_chunked_kernel(p, masked):
    """Forward, log-sum-exp and gradients in float64, with a key range (ModalityBias) and a seed above 2^32."""
    q, k, v, g = problem()
    mask = padding_mask(k.shape[2]) if masked else None
    seed, key_range = (1 << 40) + 77, (13, k.shape[2] + 40)
    call = dataclasses.replace(Call.of(q, 0.25, mask, p, seed), key_range=key_range)
    out, lse, state = dense_lse.dense_lse_forward(q, k, v, call)
    assert state == "cpu_dropout"
    ref_out, ref_lse = chunked.chunked_forward(q, k, v, call)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    grads = dense_lse.dense_lse_backward(state, g, (q, k, v), (out, lse), call)
    for a, b in zip(grads, chunked.chunked_backward(g, q, k, v, out, kernel_lse(lse), call)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_within_the_naive_drift(dtype):
    skip_without_matmul(dtype)
    q, k, v, g = problem(nq=40, nk=600)
    exact = reference.attention(q, k, v, dropout_p=0.2, dropout_seed=9, scale=0.25)
    naive = sb.dense_bias_attention(q.to(dtype), k.to(dtype), v.to(dtype), dropout_p=0.2, dropout_seed=9, scale=0.25)
    qd = q.to(dtype)
    out, _, _ = dense_lse.dense_lse_forward(qd, k.to(dtype), v.to(dtype), Call.of(qd, 0.25, None, 0.2, 9))
    assert out.dtype == dtype
    drift = float((naive.double() - exact).abs().max())
    assert float((out.double() - exact).abs().max()) <= 2 * drift + 1e-6


def test_keep_rate_is_one_minus_p_within_binomial_error():
    """With q = 0 every probability is 1/K, so each output row is (kept keys / K) / (1 - p) for v = 1."""
    p, nk, rows = 0.1, 1000, 2 * 3 * 8
    q = torch.zeros(2, 3, 8, 4)
    k, v = torch.zeros(2, 3, nk, 4), torch.ones(2, 3, nk, 4)
    kept, n = 0.0, 0
    for seed in range(40):
        out, _, _ = dense_lse.dense_lse_forward(q, k, v, Call.of(q, 1.0, None, p, seed))
        kept += float((out[..., 0] * (1 - p) * nk).round().sum())
        n += rows * nk
    z = (kept - n * (1 - p)) / math.sqrt(n * p * (1 - p))
    assert abs(z) < 4, z


def test_gradients_are_bitwise_repeatable():
    q, k, v, g = problem(dtype=torch.float32)
    mask = padding_mask(k.shape[2], torch.float32)
    runs = []
    for _ in range(2):
        call = Call.of(q, 0.25, mask, 0.1, 5)
        out, lse, state = dense_lse.dense_lse_forward(q, k, v, call)
        runs.append((out,) + tuple(dense_lse.dense_lse_backward(state, g, (q, k, v), (out, lse), call)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_gradcheck_through_sparse_bias_attention():
    win, q, k, v, wb, wc = make_case(SMALL, batch=1, heads=2, queries=3, dim=4, per_head=True, seed=3)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, wb)]

    def fn(q, k, v, wb):
        return sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc), dropout_p=0.3, dropout_seed=21)
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["fused", "sparse", "torch"])
def test_sparse_bias_attention_with_dropout_matches_the_reference(backend):
    skip_missing(backend)
    win, q, k, v, wb, wc = make_case(SMALL, per_head=True, seed=8)
    kpm = torch.zeros(2, SMALL.num_keys, dtype=torch.bool)
    kpm[0, -20:] = True
    grad = torch.randn_like(q)
    kw = dict(dropout_p=0.2, dropout_seed=(1 << 35) + 3, key_padding_mask=kpm)
    assert_all_close(forward_and_grads(sparse_fn(backend), q, k, v, wb, wc, grad, win, **kw),
                     forward_and_grads(reference.sparse_bias_attention, q, k, v, wb, wc, grad, win, **kw))


def test_modality_bias_with_dropout_matches_the_reference():
    """ModalityBias runs one dense pass per key range: the decisions are those of the whole memory."""
    _, q, k, v, wb, wc = make_case(SMALL, per_head=False, seed=4)
    bias = sb.ModalityBias(SMALL, torch.stack([wb, wc], -1))
    kw = dict(dropout_p=0.25, dropout_seed=17)
    torch.testing.assert_close(sb.sparse_bias_attention(q, k, v, bias, **kw),
                               reference.sparse_bias_attention(q, k, v, bias, **kw), rtol=1e-10, atol=1e-10)


def test_fallback_without_the_extension_gives_the_same_result(monkeypatch):
    win, q, k, v, wb, wc = make_case(SMALL, per_head=True, seed=5)
    grad = torch.randn_like(q)
    kw = dict(dropout_p=0.2, dropout_seed=3)
    fast = forward_and_grads(sparse_fn("sparse"), q, k, v, wb, wc, grad, win, **kw)
    monkeypatch.setattr(dense_lse, "extension", lambda: (None, "not built"))
    assert_all_close(forward_and_grads(sparse_fn("sparse"), q, k, v, wb, wc, grad, win, **kw), fast)


def test_module_trains_with_dropout_on_the_fast_path_and_never_drops_in_eval(monkeypatch):
    from sparse_bias.nn import SparseBiasMultiheadAttention
    used = []
    original = dense_lse.dense_kernel_name
    monkeypatch.setattr(dense_lse, "dense_kernel_name", lambda *a, **kw: used.append(original(*a, **kw)) or used[-1])
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(16, 2, attn_drop=0.1)
    plain = SparseBiasMultiheadAttention(16, 2, attn_drop=0.0)
    plain.load_state_dict(mha.state_dict())
    x, mem = torch.randn(5, 2, 16), torch.randn(30, 2, 16)
    mha.train()
    a, b = mha(x, mem, mem), mha(x, mem, mem)
    assert used and set(used) == {"cpu_dropout"} and not torch.allclose(a, b)
    used.clear()
    mha.eval()
    plain.eval()
    torch.testing.assert_close(mha(x, mem, mem), plain(x, mem, mem))
    assert "cpu_dropout" not in used


@pytest.mark.parametrize("seed", [0, (1 << 63) + 5, -7, (1 << 64) - 1])
def test_every_seed_gives_the_reference_decisions(seed):
    """Negative seeds and seeds above 2^63 reach the compiled kernels with the same 64 bits."""
    win, q, k, v, wb, wc = make_case(SMALL, per_head=True, seed=9)
    grad = torch.randn_like(q)
    kw = dict(dropout_p=0.3, dropout_seed=seed)
    assert_all_close(forward_and_grads(sparse_fn("fused"), q, k, v, wb, wc, grad, win, **kw),
                     forward_and_grads(reference.sparse_bias_attention, q, k, v, wb, wc, grad, win, **kw))
