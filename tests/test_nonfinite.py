"""Non-finite and extreme inputs behave as the dense version does (docs/limitations.md, "Non-finite inputs").

For every case -- NaN / +-inf in q, k, v, in the bias values and in a float key-padding mask, -inf bias values
(masking by bias: one entry, a whole window, every window), biases beyond exp's float32 range, a fully masked row,
logits around 1e4, denormals -- the output and the gradients (q, k, v, bias values) of every backend have the NaN /
+inf / -inf pattern of the dense evaluation in the same dtype, and their finite values are within the error budget
that same-precision dense evaluation has against float64 (measured here). With the debug checks on, a non-finite q,
k, v, bias value or float mask (other than -inf in a mask) is the documented ValueError naming the argument instead.

The dense version of `sparse_bias_attention` is ``softmax(q k^T * scale + bias.to_dense() + mask) v`` over all
keys -- ``scaled_dot_product_attention``'s math path, a fully masked row giving zeros (PyTorch 2.5+; the library's
convention on every torch). The dense version of `window_attention` is that softmax over each query's window keys:
a value outside a query's window never reaches it (where the materialised ``-inf`` mask of the dense LAM turns a NaN
outside the window into ``NaN + -inf = NaN`` for every query; `test_window_attention_reads_only_the_window`).
"""
import os

import pytest
import torch

import sparse_bias as sb
from helpers import CORRECTION_BACKENDS, SMALL, WINDOW_BACKENDS, make_case, pytest_under_the_interpreter, skip_missing

INF, NAN = float("inf"), float("nan")
UNDER_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"


def _key_in_window(win):
    return int(win.key[0])                          # a key of query 0's window (batch element 0)


def _key_outside(win):
    seen = set(win.key[: int(win.indptr[win.num_queries])].tolist())       # every window key of batch element 0
    return next(j for j in range(SMALL.num_keys) if j not in seen)


def _at(t, index, value):
    t[index] = value
    return t


def _float_kpm(dtype, index, value):
    return _at(torch.zeros(2, SMALL.num_keys, dtype=dtype), index, value)


#: name -> f(q, k, v, values, win) -> (q, k, v, values, key_padding_mask or None, whether the debug checks refuse it)
CASES = {
    "q nan": lambda q, k, v, w, win: (_at(q, (0, 0, 0, 0), NAN), k, v, w, None, "q"),
    "q +inf": lambda q, k, v, w, win: (_at(q, (0, 1, 2, 3), INF), k, v, w, None, "q"),
    "k nan in a window": lambda q, k, v, w, win: (q, _at(k, (0, 0, _key_in_window(win), 0), NAN), v, w, None, "k"),
    "k nan outside the windows": lambda q, k, v, w, win: (q, _at(k, (0, 0, _key_outside(win), 0), NAN), v, w, None,
                                                          "k"),
    "k -inf": lambda q, k, v, w, win: (q, _at(k, (0, 0, _key_in_window(win), 0), -INF), v, w, None, "k"),
    "v nan in a window": lambda q, k, v, w, win: (q, k, _at(v, (0, 0, _key_in_window(win), 0), NAN), w, None, "v"),
    "v nan outside the windows": lambda q, k, v, w, win: (q, k, _at(v, (0, 0, _key_outside(win), 0), NAN), w, None,
                                                          "v"),
    "v +inf": lambda q, k, v, w, win: (q, k, _at(v, (0, 0, _key_in_window(win), 0), INF), w, None, "v"),
    "v -inf outside the windows": lambda q, k, v, w, win: (q, k, _at(v, (0, 2, _key_outside(win), 1), -INF), w,
                                                           None, "v"),
    "bias nan": lambda q, k, v, w, win: (q, k, v, _at(w, 0, NAN), None, "bias.values"),
    "bias +inf": lambda q, k, v, w, win: (q, k, v, _at(w, 0, INF), None, "bias.values"),
    "bias -inf on one entry": lambda q, k, v, w, win: (q, k, v, _at(w, 0, -INF), None, "bias.values"),
    "bias -inf on a whole window": lambda q, k, v, w, win: (q, k, v, _at(w, slice(0, int(win.indptr[1])), -INF),
                                                            None, "bias.values"),
    "bias -inf everywhere": lambda q, k, v, w, win: (q, k, v, w.fill_(-INF), None, "bias.values"),
    "bias +100 (exp overflows float32)": lambda q, k, v, w, win: (q, k, v, _at(w, slice(0, 3), 100.0), None, None),
    "bias -100": lambda q, k, v, w, win: (q, k, v, _at(w, slice(0, 40), -100.0), None, None),
    "mask nan": lambda q, k, v, w, win: (q, k, v, w, _float_kpm(q.dtype, (0, 5), NAN), "key_padding_mask"),
    "mask +inf": lambda q, k, v, w, win: (q, k, v, w, _float_kpm(q.dtype, (0, 5), INF), "key_padding_mask"),
    "mask -inf on most keys": lambda q, k, v, w, win: (q, k, v, w, _float_kpm(q.dtype, (0, slice(0, 150)), -INF),
                                                       None),
    "every key masked (batch element 0)": lambda q, k, v, w, win: (
        q, k, v, w, _at(torch.zeros(2, SMALL.num_keys, dtype=torch.bool), 0, True), None),
    "logits 1e4": lambda q, k, v, w, win: (q * 1250, k, v, w, None, None),
    "denormal q, k, v": lambda q, k, v, w, win: (q * 1e-39, k * 1e-39, v * 1e-39, w, None, None),
    "denormal bias": lambda q, k, v, w, win: (q, k, v, w * 1e-40, None, None),
}

#: the cases also run in bfloat16 (the others are about values no rounding changes)
BF16_CASES = ("q nan", "k nan in a window", "v +inf", "bias -inf on a whole window", "bias +100 (exp overflows "
              "float32)", "every key masked (batch element 0)", "logits 1e4", "denormal bias")


def _case(name, dtype):
    win, q, k, v, wb, wc = make_case(SMALL, seed=3)
    values = sb.window_bias(win, wb, wc).values.detach().clone()
    q, k, v, values, kpm, refused_by = CASES[name](q.clone(), k.clone(), v.clone(), values, win)
    return win, [t.to(dtype) for t in (q, k, v)], values.to(torch.float32 if dtype != torch.float64 else dtype), \
        kpm, refused_by


def _dense_version(op, q, k, v, values, win, kpm):
    """The dense evaluation in q's dtype: softmax over all keys (op "sparse") or over each query's window keys,
    gathered (op "window"); a fully masked row gives zeros."""
    mask = torch.zeros(q.shape[0], SMALL.num_keys, dtype=q.dtype)
    if kpm is not None:
        mask = mask.masked_fill(kpm, -INF) if kpm.dtype == torch.bool else mask + kpm.to(q.dtype)
    if op == "window":
        return _window_version(q, k, v, values, win, mask)
    bias = sb.SparseBias(win, values).to_dense().to(q.dtype)[:, None]                   # [B, 1, Q, K]
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias + mask[:, None, None, :]
    dead = torch.isneginf(s).all(-1, keepdim=True)                 # zeros, with zero gradients (no softmax of -inf)
    out = torch.matmul(torch.softmax(s.masked_fill(dead, 0.0), dim=-1), v)
    return out.masked_fill(dead, 0.0)


def _window_version(q, k, v, values, win, mask):
    """Per query, the softmax over its window keys only (gathered from ``indptr`` / ``key``)."""
    rows = []
    for b in range(q.shape[0]):
        for i in range(q.shape[2]):
            r = b * q.shape[2] + i
            e0, e1 = int(win.indptr[r]), int(win.indptr[r + 1])
            keys = win.key[e0:e1]
            s = (q[b, :, i:i + 1] @ k[b][:, keys].transpose(-1, -2)).squeeze(1) * q.shape[-1] ** -0.5   # [H, n]
            s = s + values[e0:e1].to(q.dtype) + mask[b, keys]
            dead = torch.isneginf(s).all(-1, keepdim=True)               # an empty window too
            p = torch.softmax(s.masked_fill(dead, 0.0), dim=-1)
            o = (p.unsqueeze(-1) * v[b][:, keys]).sum(1)                                               # [H, D]
            rows.append(o.masked_fill(dead, 0.0))
    return torch.stack(rows, 1).view(q.shape[1], q.shape[0], q.shape[2], -1).transpose(0, 1)


def _run(fn, q, k, v, values, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, values)]
    out = fn(*leaves)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad.to(out.dtype)))


def _sdpa(op, q, k, v, values, win, kpm):
    """The dense version as users run it: ``scaled_dot_product_attention`` with the materialised bias (a constant
    mask: the default CPU kernel), for the rounding budget."""
    mask = sb.SparseBias(win, values.detach()).to_dense().to(q.dtype)[:, None]
    if op == "window":
        mask = mask.masked_fill(~win.to_dense_mask()[:, None], -INF)
    if kpm is not None:
        mask = mask + (torch.zeros(kpm.shape, dtype=q.dtype).masked_fill(kpm, -INF) if kpm.dtype == torch.bool
                       else kpm.to(q.dtype))[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask) + 0 * values.sum()


def _floors(q, k, v, grad, dtype):
    """Per output (out, dq, dk, dv, d values), the rounding of its terms in the compute dtype (float32 for half
    inputs): what a correct build may differ by where the true value cancels to ~0."""
    eps = torch.finfo(torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype).eps
    mq, mk, mv, mg = (float(t.double()[torch.isfinite(t)].abs().max()) for t in (q, k, v, grad))
    gv, scale = mg * mv, q.shape[-1] ** -0.5
    return [16 * eps * x for x in (mv, gv * mk * scale, gv * mq * scale, mg, gv)]


def _pattern_and_values(got, naive, others, exact, floors):
    """``got`` has ``naive``'s NaN / +inf / -inf pattern; its finite values are within 4x the largest error of
    ``naive`` and ``others`` (the same-precision dense evaluations) against ``exact``, or the rounding floor."""
    names = ["out", "dq", "dk", "dv", "d values"]
    for i, (name, a, n, e) in enumerate(zip(names, got, naive, exact)):
        a, n, e = a.double(), n.double(), e.double()
        for what, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
            assert torch.equal(test(a), test(n)), (f"{name}: {what} at {int(test(a).sum())} places, the dense "
                                                   f"version's at {int(test(n).sum())}")
        finite = torch.isfinite(n) & torch.isfinite(e)
        for o in others:
            finite &= torch.isfinite(o[i].double())
        if not finite.any():
            continue
        naive_err = max(float((x[i].double()[finite] - e[finite]).abs().max()) for x in [naive] + others)
        budget = 4 * naive_err + floors[i]
        err = float((a[finite] - e[finite]).abs().max())
        assert err <= budget, f"{name}: error {err:.3g} against float64, budget {budget:.3g} (dense: {naive_err:.3g})"


def _check(op, backend, name, dtype, debug):
    skip_missing(backend, dtype)
    win, (q, k, v), values, kpm, refused_by = _case(name, dtype)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def ours(q_, k_, v_, w_):
        bias = sb.SparseBias(win, w_)
        if op == "window":
            return sb.window_attention(q_, k_, v_, win, bias, key_padding_mask=kpm, backend=backend)
        return sb.sparse_bias_attention(q_, k_, v_, bias, key_padding_mask=kpm, backend=backend)

    def dense(fn, dt):
        mask = kpm if kpm is None or kpm.dtype == torch.bool else kpm.to(dt)
        return _run(lambda *a: fn(op, *a, win, mask), *(t.to(dt) for t in (q, k, v, values)), grad)

    sb.set_debug_checks(debug)
    try:
        if debug and refused_by is not None:
            with pytest.raises(ValueError, match=f"{refused_by} contains"):
                ours(q, k, v, values)
            return
        got = _run(ours, q, k, v, values, grad)
    finally:
        sb.set_debug_checks(False)
    naive = dense(_dense_version, dtype)
    if (op, backend) == ("window", "dense"):
        # the materialised local mask, the reference backend: its matmuls multiply a non-finite key or value
        # outside a window by a probability of 0 -- NaN at more places, never finite where the window gives NaN
        for a, n in zip(got, naive):
            assert not (n.isnan() & ~a.isnan()).any()
        return
    _pattern_and_values(got, naive, [dense(_sdpa, dtype)], dense(_dense_version, torch.float64),
                        _floors(q, k, v, grad, dtype))


def _params(backends):
    cases = [(name, torch.float32) for name in CASES] + [(name, torch.bfloat16) for name in BF16_CASES]
    return [pytest.param(backend, name, dtype, id=f"{backend}-{name}-{str(dtype)[6:]}")
            for backend in backends for name, dtype in cases]


def _cpu_backends(backends):
    """Every registered backend but Triton's, which runs on CPU tensors under the interpreter only."""
    return [b for b in backends if b != "triton" or UNDER_INTERPRETER] + ["dense"]


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
@pytest.mark.parametrize("backend, name, dtype", _params(_cpu_backends(CORRECTION_BACKENDS)))
def test_sparse_bias_attention(backend, name, dtype, debug):
    _check("sparse", backend, name, dtype, debug)


@pytest.mark.parametrize("debug", [False, True], ids=["debug-off", "debug-on"])
@pytest.mark.parametrize("backend, name, dtype", _params(_cpu_backends(WINDOW_BACKENDS)))
def test_window_attention(backend, name, dtype, debug):
    _check("window", backend, name, dtype, debug)


def test_window_attention_reads_only_the_window():
    """The documented difference from the materialised dense LAM: a NaN key outside every window leaves the
    output finite (the dense mask's ``NaN + -inf`` makes every query of that head NaN), one inside a window makes
    exactly the rows that see it NaN."""
    win, (q, k, v), values, _, _ = _case("k nan outside the windows", torch.float32)
    out = sb.window_attention(q, k, v, win, sb.SparseBias(win, values))
    assert torch.isfinite(out).all()
    lam = torch.where(win.to_dense_mask(), sb.SparseBias(win, values).to_dense(), torch.tensor(-INF))
    dense_lam = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=lam[:, None])
    assert torch.isnan(dense_lam[0, 0]).all()


@pytest.mark.skipif(UNDER_INTERPRETER, reason="runs this file under the interpreter")
@pytest.mark.parametrize("selection", [
    "triton and float32 and debug-off and (q and nan or bias and inf or v and inf or every)",
    pytest.param("triton", marks=pytest.mark.slow)])
def test_triton_kernels_under_the_interpreter(selection, monkeypatch):
    """The Triton kernels (correction, exact rows, window attention) on the same cases, in a fresh process under
    the interpreter; its first-use self-checks are off there (tested in test_self_check.py)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SPARSE_BIAS_SELF_CHECK", "off")
    pytest_under_the_interpreter(__file__, "-k", selection)
