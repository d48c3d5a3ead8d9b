"""The adapters of PyTorch's private CUDA attention ops, against an emulation of those ops on CPU.

``EmulatedOps`` reproduces the ops' documented conventions with the chunked kernel: the flash op refuses a
head dim that is not a multiple of 8 and wants its forward's sequence metadata and philox ``(seed, offset)``
back in its backward; the efficient op returns the log-sum-exp padded to a multiple of 32 queries (with
garbage in the padding), wants that padded tensor back, and an ``attn_bias`` whose rows are 16-aligned. A
wrong slice, pad or argument order in :mod:`sparse_bias.dense.private_ops` fails these tests without a GPU.
"""
import math

import pytest
import torch

from sparse_bias._core.call import Call
from sparse_bias.dense import private_ops as ops_mod
from sparse_bias.dense.chunked import chunked_backward, chunked_forward


def _chunked_forward(q, k, v, mask, scale, p, seed):
    return chunked_forward(q, k, v, Call.of(q, scale, mask, p, seed))


def _chunked_backward(grad_out, q, k, v, out, lse, mask, scale, p, seed):
    return chunked_backward(grad_out, q, k, v, out, lse, Call.of(q, scale, mask, p, seed))


class EmulatedOps:
    """``torch.ops.aten``'s two private attention ops (and backwards), emulated with the chunked kernel."""

    def __init__(self):
        self.calls = []
        self.philox = (torch.tensor(1234), torch.tensor(56))

    def _scaled_dot_product_flash_attention(self, q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False,
                                            *, scale=None):
        self.calls.append("flash")
        assert q.shape[-1] % 8 == 0 and k.shape[-1] == q.shape[-1] == v.shape[-1], "head dim must be a multiple of 8"
        assert dropout_p == 0.0 and not is_causal and not return_debug_mask
        out, lse = _chunked_forward(q, k, v, None, scale, 0.0, 0)
        nq, nk = q.shape[2], k.shape[2]
        self.meta = (torch.empty(0), torch.empty(0), nq, nk)
        return (out, lse) + self.meta + self.philox + (torch.empty(0),)

    def _scaled_dot_product_flash_attention_backward(self, grad_out, q, k, v, out, lse, cum_q, cum_k, max_q, max_k,
                                                     dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
        self.calls.append("flash_backward")
        assert all(t.shape[-1] % 8 == 0 for t in (grad_out, q, k, v, out)), "head dim must be a multiple of 8"
        assert cum_q is self.meta[0] and cum_k is self.meta[1] and (max_q, max_k) == self.meta[2:], "sequence metadata"
        assert philox_seed is self.philox[0] and philox_offset is self.philox[1], "philox (seed, offset) order"
        assert dropout_p == 0.0 and is_causal is False
        assert lse.shape == q.shape[:3]
        return _chunked_backward(grad_out, q, k, v, out, lse, None, scale, 0.0, 0)

    def _scaled_dot_product_efficient_attention(self, q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0,
                                                is_causal=False, *, scale=None):
        self.calls.append("efficient")
        assert compute_log_sumexp is True and dropout_p == 0.0 and not is_causal
        self._check_bias(attn_bias, q, k)
        out, lse = _chunked_forward(q, k, v, attn_bias, scale, 0.0, 0)
        nq = q.shape[2]
        padded = torch.full(q.shape[:2] + (math.ceil(nq / 32) * 32,), float("inf"), dtype=lse.dtype)   # garbage pad
        padded[..., :nq] = lse
        return out, padded, self.philox[0], self.philox[1]

    def _scaled_dot_product_efficient_attention_backward(self, grad_out, q, k, v, attn_bias, out, logsumexp,
                                                         philox_seed, philox_offset, dropout_p, grad_input_mask,
                                                         is_causal=False, *, scale=None):
        self.calls.append("efficient_backward")
        assert logsumexp.shape[-1] % 32 == 0, "the backward wants the raw (padded) log-sum-exp"
        assert philox_seed is self.philox[0] and philox_offset is self.philox[1], "philox (seed, offset) order"
        assert dropout_p == 0.0 and list(grad_input_mask) == [True, True, True, False] and not is_causal
        self._check_bias(attn_bias, q, k)
        dq, dk, dv = _chunked_backward(grad_out, q, k, v, out, logsumexp[..., :q.shape[2]], attn_bias, scale, 0.0, 0)
        return dq, dk, dv, torch.empty(0)

    @staticmethod
    def _check_bias(bias, q, k):
        if bias is not None:
            assert bias.shape == q.shape[:3] + k.shape[2:3] and bias.dtype == q.dtype
            assert bias.stride(-2) % 16 == 0 or bias.stride(-2) == 0, "attn_bias rows must be 16-aligned"


def problem(dim, nq=37, nk=29, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, nq, dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 3, nk, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    g = torch.randn(2, 3, nq, dim, generator=gen, dtype=torch.float64)
    return q, k, v, g


@pytest.mark.parametrize("dim", [12, 16, 20])
def test_flash_adapter_pads_the_head_dim_and_passes_the_state_back(dim):
    q, k, v, g = problem(dim)
    ops = EmulatedOps()
    out, lse, aux = ops_mod.flash_forward(ops, q, k, v, 0.3)
    ref_out, ref_lse = _chunked_forward(q, k, v, None, 0.3, 0.0, 0)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    grads = ops_mod.flash_backward(ops, aux, g, (q, k, v, out, lse), 0.3)
    for got, want in zip(grads, _chunked_backward(g, q, k, v, out, ref_lse, None, 0.3, 0.0, 0)):
        assert got.shape == q.shape[:2] + want.shape[2:]
        torch.testing.assert_close(got, want)
    assert ops.calls == ["flash", "flash_backward"]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("nq", [5, 32, 37])
def test_efficient_adapter_slices_the_padded_lse_and_aligns_the_bias(nq, masked):
    q, k, v, g = problem(16, nq=nq, nk=29)
    mask = None
    if masked:
        mask = torch.zeros(2, 1, 1, 29, dtype=torch.float64)
        mask[0, ..., 3:7] = float("-inf")
    ops = EmulatedOps()
    out, lse, aux = ops_mod.efficient_forward(ops, q, k, v, mask, 0.25)
    ref_out, ref_lse = _chunked_forward(q, k, v, mask, 0.25, 0.0, 0)
    assert lse.shape == q.shape[:3]
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    grads = ops_mod.efficient_backward(ops, aux, g, (q, k, v, out), mask, 0.25)
    for got, want in zip(grads, _chunked_backward(g, q, k, v, out, ref_lse, mask, 0.25, 0.0, 0)):
        torch.testing.assert_close(got, want)


def test_a_wrong_adapter_fails_against_the_emulation():
    """The emulation is strict enough to catch the mistakes it exists for."""
    q, k, v, g = problem(12)
    ops = EmulatedOps()
    with pytest.raises(AssertionError, match="multiple of 8"):
        ops._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=0.3)
    out, lse, (raw, seed, offset) = ops_mod.efficient_forward(ops, *problem(16)[:3], None, 0.3)
    q, k, v, g = problem(16)
    with pytest.raises(AssertionError, match="padded"):
        ops_mod.efficient_backward(ops, (lse, seed, offset), g, (q, k, v, out), None, 0.3)
    with pytest.raises(AssertionError, match="philox"):
        ops_mod.efficient_backward(ops, (raw, offset, seed), g, (q, k, v, out), None, 0.3)
