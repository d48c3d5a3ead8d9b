"""The Triton kernels on shapes that stress their block edges, through the public API: `sparse_bias_attention` (the
correction and exact-row kernels) and `window_attention` (the window kernels) with ``backend="triton"``.

The grid: head dims 24 and 48 (not powers of two: the kernels pad to 32 / 64 lanes), (Q, K) of (1, 1), (1, 45),
(33, 1) and (33, 70) (not multiples of the 32-entry / 32-key blocks; a 70-key window spans three blocks), windows
with an empty row, a whole-range row and random rows, key padding none / in the tail of batch 1 / all of batch 1
(fully masked rows), shared and per-head bias values of both signs up to 5 (negative ones take the exact-row
kernels), three memory layouts of inputs and output gradient, in float32 / bfloat16 / float16.

Each case compares the output and the gradients (q, k, v, bias values) with the float64 dense reference
(tests/reference.py, built from ``indptr`` / ``key``); the budget is twice the error of the same dense computation
run in the tested dtype from the same rounded inputs, measured in the same test (at least one rounding step of the
tensor's largest element), plus 1e-5 of that element.

Without a GPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` before triton is imported), so
the tests here run again in a subprocess: a pairwise-covering selection in ``make test``, the whole grid behind the
slow marker. With CUDA they run on the GPU directly.
"""
import itertools
import os

import pytest
import torch

import reference
import sparse_bias as sb
from helpers import pytest_under_the_interpreter
from sparse_bias.backends.triton import TRITON_AVAILABLE

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed (extra: triton)")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVE = INTERPRETED or torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"
active = pytest.mark.skipif(not ACTIVE, reason="runs in the interpreter subprocess of "
                                                "test_edges_under_the_interpreter (or on CUDA)")

OPS = ["correction", "window"]
DIMS = [24, 48]
SHAPES = [(1, 1), (1, 45), (33, 1), (33, 70)]          # (Q, K)
PADDING = ["none", "tail", "batch"]
LAYOUTS = ["contiguous", "module", "expanded"]
BIASES = ["shared", "per_head"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BATCH, HEADS = 2, 2
GRID = list(itertools.product(OPS, DIMS, SHAPES, PADDING, LAYOUTS, BIASES, DTYPES))


def _covering(grid):
    """A subset of ``grid`` holding every pair of values of any two of its axes (greedy pairwise cover)."""
    def pairs(case):
        return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(map(str, case)), 2)}
    left, chosen = set().union(*map(pairs, grid)), []
    while left:
        best = max(grid, key=lambda c: len(pairs(c) & left))
        chosen.append(best)
        left -= pairs(best)
    return chosen


FAST = _covering(GRID)


def _ids(case):
    op, dim, (nq, nk), pad, lay, bias, dtype = case
    return f"{op}-D{dim}-Q{nq}-K{nk}-pad_{pad}-{lay}-{bias}-{str(dtype)[6:]}"


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the interpreted checks in a subprocess")
def test_edges_under_the_interpreter():
    pytest_under_the_interpreter(__file__, "-k", "edge_grid_fast")


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the interpreted checks in a subprocess")
def test_whole_edge_grid_under_the_interpreter():
    pytest_under_the_interpreter(__file__, "--slow", "-k", "edge_grid_all")


# ---- a case -----------------------------------------------------------------------------------------------------

def windows(nq: int, nk: int, gen: torch.Generator) -> sb.WindowIndex:
    """Random windows on a one-row BEV grid of ``nk`` keys: row 0 holds every key, the last row none, the others a
    random subset (ascending, as the index requires)."""
    rows = BATCH * nq
    counts = torch.randint(0, nk + 1, (rows,), generator=gen)
    counts[0], counts[-1] = nk, 0
    key = torch.cat([torch.randperm(nk, generator=gen)[:c].sort().values for c in counts.tolist()])
    indptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    zeros = torch.zeros(key.numel(), dtype=torch.int32)
    win = sb.WindowIndex(sb.KeyLayout(bev_shape=(1, nk)), BATCH, nq, indptr, key, zeros.to(torch.int8), zeros, zeros)
    return win.validate().to(DEVICE)


def key_padding(kind: str, nk: int):
    """bool ``[B, K]`` (True = ignore): none, the last quarter of batch 1's keys, or every key of batch 1."""
    if kind == "none":
        return None
    kpm = torch.zeros(BATCH, nk, dtype=torch.bool, device=DEVICE)
    kpm[1, -max(1, nk // 4):] = True
    if kind == "batch":
        kpm[1] = True
    return kpm


def views(leaves, layout: str):
    """q, k, v ``[B, H, Q|K, D]`` and the output gradient as views of the leaves, laid out as ``layout`` says:
    ``contiguous``; ``module`` -- q permuted from the projection's ``[B, Q, H, D]``, k a view with a last-dim stride
    of 2, v transposed from ``[B, H, D, K]``, the gradient with a last-dim stride of 2; ``expanded`` -- q sliced
    from a longer query axis, k and v expanded over the heads (stride 0), the gradient expanded over the queries."""
    q, k, v, g = leaves
    if layout == "contiguous":
        return q, k, v, g
    if layout == "module":
        return q.permute(0, 2, 1, 3), k[..., ::2], v.transpose(-1, -2), g[..., ::2]
    q = q[:, :, 1:]
    return q, k.expand(-1, HEADS, -1, -1), v.expand(-1, HEADS, -1, -1), g.expand(-1, -1, q.shape[2], -1)


def leaf_shapes(layout: str, nq: int, nk: int, dim: int):
    """The shapes of the tensors `views` takes (q, k, v, output gradient)."""
    b, h = BATCH, HEADS
    if layout == "contiguous":
        return [(b, h, nq, dim), (b, h, nk, dim), (b, h, nk, dim), (b, h, nq, dim)]
    if layout == "module":
        return [(b, nq, h, dim), (b, h, nk, 2 * dim), (b, h, dim, nk), (b, h, nq, 2 * dim)]
    return [(b, h, nq + 1, dim), (b, 1, nk, dim), (b, 1, nk, dim), (b, h, 1, dim)]


class FlashStyle(torch.autograd.Function):
    """The dense version as a flash kernel computes it: scores, softmax and ``p v`` in float32 from the inputs in
    their dtype, the output rounded to it; the backward's ``ds = p (dp - <g, o>)`` from that rounded output (CUDA's
    flash / efficient attention, FlexAttention, PyTorch's CPU flash kernel). Its rounding is that of a correct
    implementation too: where the exact gradient is 0 (a row with one key: ``dq = 0``) it is not.

    With ``terms=True`` (float64 inputs) it gives instead the magnitude of the terms each result sums: ``p |v|``
    forward, and the same products of absolute values in the backward, ``|ds| <= p (|g| |v|^T + |<g, o>|)``: a
    sum rounded in float32, as every kernel here accumulates, is off by about ``eps`` times that, however far the
    terms cancel."""

    @staticmethod
    def forward(ctx, q, k, v, values, win, kpm, window: bool, terms: bool = False):
        work = torch.float64 if terms else torch.float32
        dense = reference.dense_from_entries(win, values.to(work))
        s = reference.scores(q.to(work), k.to(work), dense, key_padding_mask=kpm,
                             window=reference.window_mask(win) if window else None)
        live = (s > float("-inf")).any(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(~live, 0.0), -1) * live
        out = (p @ v.to(work)).to(q.dtype)
        ctx.save_for_backward(q, k, v, values, p, out)
        ctx.win, ctx.terms = win, terms
        return (p @ v.abs()) if terms else out

    @staticmethod
    def backward(ctx, g):
        q, k, v, values, p, out = ctx.saved_tensors
        work = p.dtype
        q, k, v, g = (t.to(work) for t in (q, k, v, g))
        delta = (g * out.to(work)).sum(-1, keepdim=True)
        if ctx.terms:
            q, k, v, g, delta = q.abs(), k.abs(), v.abs(), g.abs(), delta.abs()
        dp = g @ v.transpose(-1, -2)
        ds = p * (dp + delta if ctx.terms else dp - delta)
        scale = q.shape[-1] ** -0.5
        dq, dk, dv = ds @ k * scale, ds.transpose(-1, -2) @ q * scale, p.transpose(-1, -2) @ g
        win = ctx.win
        at = ds.permute(0, 2, 3, 1).reshape(-1, ds.shape[3], ds.shape[1])[reference.entry_rows(win), win.key]
        dvalues = at.sum(-1) if values.dim() == 1 else at                                   # [nnz] / [nnz, H]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dvalues.to(values.dtype), None, None, None,
                None)


def make(op, dim, shape, pad, layout, bias, dtype, seed=0):
    """``run(fn, dt)``: [out, dq, dk, dv, dvalues] in float64 of ``fn`` ("triton", "reference": the dense version
    written plainly in ``dt``, "flash": `FlashStyle`, or "terms": its magnitudes of the terms) on the case's inputs rounded to ``dtype`` and cast to
    ``dt``, the gradients with respect to the tensors the views are taken of."""
    nq, nk = shape
    gen = torch.Generator().manual_seed(seed)
    win = windows(nq, nk, gen)
    vals_shape = (win.nnz, HEADS) if bias == "per_head" else (win.nnz,)
    base = [torch.randn(s, generator=gen, dtype=torch.float64) for s in leaf_shapes(layout, nq, nk, dim)]
    vals = (torch.rand(vals_shape, generator=gen, dtype=torch.float64) * 10 - 5)  # both signs, up to 5
    kpm = key_padding(pad, nk)
    base = [t.to(dtype).double().to(DEVICE) for t in base]                # one set of inputs for every dtype
    vals = vals.to(dtype).double().to(DEVICE)

    def run(fn: str, dt):
        leaves = [t.to(dt).requires_grad_() for t in base[:3]] + [base[3].to(dt)]
        values = vals.to(dt).requires_grad_()
        q, k, v, g = views(leaves, layout)
        sparse = sb.SparseBias(win, values)
        kw = dict(key_padding_mask=kpm)
        if fn in ("flash", "terms"):
            if fn == "terms":
                g = g.abs()
            out = FlashStyle.apply(q, k, v, values, win, kpm, op == "window", fn == "terms")
        elif fn == "triton" and op == "correction":
            out = sb.sparse_bias_attention(q, k, v, sparse, backend="triton", **kw)
        elif fn == "triton":
            out = sb.window_attention(q, k, v, win, sparse, backend="triton", **kw)
        elif op == "correction":
            out = reference.sparse_bias_attention(q, k, v, sparse, **kw)
        else:
            out = reference.window_attention(q, k, v, win, sparse, **kw)
        assert out.dtype == dt and out.shape == q.shape
        grads = torch.autograd.grad(out, leaves[:3] + [values], g)
        return [out.detach().double()] + [t.double() for t in grads]
    return run


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def check(case, seed=0):
    """The kernels' output and gradients within twice the drift of the dense version in the same dtype: the larger
    error, against the float64 reference, of the plain computation and of the flash-style one; at least one
    rounding step of the tensor's largest element in the dtype, and of its largest sum of terms in float32."""
    dtype = case[-1]
    run = make(*case, seed=seed)
    exact, fast, terms = run("reference", torch.float64), run("triton", dtype), run("terms", torch.float64)
    dense = [run("reference", dtype), run("flash", dtype)]
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    for i, name in enumerate(["out", "dq", "dk", "dv", "dvalues"]):
        e, f = exact[i], fast[i]
        assert torch.isfinite(f).all(), name
        size = _max_abs(e)
        drift = max([_max_abs(d[i] - e) for d in dense] + [eps * size, eps32 * _max_abs(terms[i])])
        err = _max_abs(f - e)
        assert err <= 2 * drift + 1e-5 * size, (name, err, drift, size)


@active
@pytest.mark.parametrize("case", FAST, ids=_ids)
def test_edge_grid_fast(case, monkeypatch):
    monkeypatch.setenv("SPARSE_BIAS_SELF_CHECK", "off")
    check(case)


@active
@pytest.mark.slow
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_edge_grid_all(case, monkeypatch):
    monkeypatch.setenv("SPARSE_BIAS_SELF_CHECK", "off")
    check(case, seed=1)


def test_docs_state_the_grid():
    """docs/gpu.md gives the number of cases run here."""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "gpu.md")) as f:
        text = f.read()
    assert f"{len(FAST)} pairwise-covering cases in `make test`, all {len(GRID)} with `--slow`" in text
