"""Autocast and mixed dtypes (docs/conventions.md, "Dtypes and autocast").

Under ``torch.autocast`` the ops cast q, k, v as ``scaled_dot_product_attention`` does (float32 / half to the autocast
dtype, float64 left alone) and run in their compute dtype inside: the output and the gradients have the dtypes SDPA
gives under the same autocast, within the bfloat16 budget (4x SDPA's own error under autocast against float64, as in
the precision tests). Bias values of another floating dtype than q are used in the compute dtype: the output is
in q's dtype, their gradient in theirs.
"""
import pytest
import torch
import torch.nn.functional as F

import sparse_bias as sb
from helpers import SMALL, make_case
from sparse_bias.nn import SparseBiasMultiheadAttention

OPS = ["sparse", "window", "dense"]


def _call(op, q, k, v, win, values):
    bias = sb.SparseBias(win, values)
    if op == "window":
        return sb.window_attention(q, k, v, win, bias)
    if op == "dense":
        return sb.sparse_bias_attention(q, k, v, bias, backend="dense")
    return sb.sparse_bias_attention(q, k, v, bias)


def _sdpa(op, q, k, v, win, values):
    mask = sb.SparseBias(win, values).to_dense()[:, None]
    if op == "window":
        mask = mask.masked_fill(~win.to_dense_mask()[:, None], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))


def _grads(fn, leaves, grad):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    return [out] + list(torch.autograd.grad(out, leaves, grad.to(out.dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", OPS)
def test_autocast_gives_sdpas_dtypes_within_the_budget(op, dtype):
    win, q, k, v, wb, wc = make_case(SMALL, dtype=torch.float32, seed=5)
    values = sb.window_bias(win, wb.float(), wc.float()).values.detach()
    grad = torch.randn(q.shape[:3] + (v.shape[-1],), generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=dtype):
        got = _grads(lambda *a: _call(op, *a[:3], win, a[3]), (q, k, v, values), grad)
        want = _grads(lambda *a: _sdpa(op, *a[:3], win, a[3]), (q, k, v, values), grad)
    assert [t.dtype for t in got] == [t.dtype for t in want]            # out in dtype; dq, dk, dv, d values float32
    assert got[0].dtype == dtype
    exact = _grads(lambda *a: _sdpa(op, *a[:3], win, a[3]), [t.double() for t in (q, k, v, values)], grad.double())
    for name, a, w, e in zip(["out", "dq", "dk", "dv"], got, want, exact):  # SDPA gives no bias gradient here
        err, naive = (float((x.double() - e).abs().max()) for x in (a, w))
        assert err <= 4 * naive + 1e-6, f"{name}: {err:.3g} against float64; SDPA under autocast {naive:.3g}"


def test_autocast_module_matches_mmcvs_dtype():
    """mmcv's MultiheadAttention returns ``identity + out_proj(attention)``: float32 for a float32 query under
    autocast (the bfloat16 attention added to it), as the module does."""
    torch.manual_seed(0)
    ours = SparseBiasMultiheadAttention(16, 2, batch_first=True)
    ref = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn = ref(x, x, x)[0]
        assert attn.dtype == torch.bfloat16
        assert ours(x, x, x).dtype == (x + attn).dtype


def test_float64_is_left_alone_under_autocast():
    win, q, k, v, wb, wc = make_case(SMALL)
    bias = sb.window_bias(win, wb, wc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sb.sparse_bias_attention(q, k, v, bias)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sb.sparse_bias_attention(q, k, v, bias))


@pytest.mark.parametrize("values_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("op", OPS)
def test_bias_values_of_another_dtype_are_used_in_the_compute_dtype(op, q_dtype, values_dtype):
    win, q, k, v, wb, wc = make_case(SMALL, seed=7)
    q, k, v = (t.to(q_dtype) for t in (q, k, v))
    values = sb.window_bias(win, wb, wc).values.detach().to(values_dtype)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _grads(lambda *a: _call(op, *a[:3], win, a[3]), (q, k, v, values), grad)
    assert got[0].dtype == q_dtype and got[4].dtype == values_dtype
    compute = torch.float64 if q_dtype == torch.float64 else torch.float32
    same = _grads(lambda *a: _call(op, *a[:3], win, a[3]), (q, k, v, values.to(compute)), grad)
    for a, b in zip(got, same):
        if op == "dense":        # the dense path adds the bias in q's dtype: the values round there first
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-2, atol=1e-2)
        else:                    # the fused paths convert the values to the compute dtype: bitwise the same
            torch.testing.assert_close(a, b.to(a.dtype), rtol=0, atol=0)
