"""The fused Triton window-attention kernels (`sparse_bias.backends.triton.window`) against a dense float64
reference, forward and backward, in float32 / bfloat16 / float16.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors): the interpreter must
be switched on before triton is imported, so ``test_kernels_under_the_interpreter`` runs this file again in a
subprocess with the variable set. With CUDA the kernels run on the GPU directly.

The reference materialises the ``[B, h, Q, K]`` score matrix with -inf outside each row's window entries
(built from ``indptr`` / ``key``), adds the bias / mask values at the entries, takes a softmax whose fully
masked rows give zeros, applies the dropout multipliers and multiplies by ``v``; gradients come from autograd
in float64 (``q``, ``k``, ``v`` and per-head bias values at the entries, i.e. the score gradient ``ds``).
float32 results are held to 1e-5 of each tensor's largest magnitude; bfloat16 / float16 results to twice the
drift of the same dense computation run in that dtype (from the same rounded inputs) plus a small slack.
"""
import os
from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from helpers import pytest_under_the_interpreter
from sparse_bias.backends.triton import TRITON_AVAILABLE, window as tw

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed (extra: triton)")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVE = INTERPRETED or torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
active = pytest.mark.skipif(not ACTIVE, reason="runs in the interpreter subprocess of "
                                                "test_kernels_under_the_interpreter (or on CUDA)")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG = float("-inf")


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the interpreted checks in a subprocess")
def test_kernels_under_the_interpreter():
    pytest_under_the_interpreter(__file__)


# ---- problems ------------------------------------------------------------------------------------------------

@dataclass
class Case:
    q: torch.Tensor          # [B, H, Q, D] float64 (values representable in the tested dtype)
    k: torch.Tensor          # [B, H, K, D]
    v: torch.Tensor
    g: torch.Tensor          # [B, H, Q, D] output gradient
    indptr: torch.Tensor     # int64 [B*Q + 1]
    key: torch.Tensor        # int64 [nnz]
    bvals: Optional[torch.Tensor]   # float32 [h or 1, nnz]
    emask: Optional[torch.Tensor]   # float32 [h or 1, nnz], 0 / -inf
    keep: Optional[torch.Tensor]    # float32 [h, nnz], 0 / 1.25
    scale: float
    h0: int
    h: int

    @property
    def dims(self):
        nb, heads, nq, dim = self.q.shape
        return nb, heads, nq, self.k.shape[2], dim


def make_case(dtype, batch=2, heads=3, nq=12, nk=40, dim=16, h0=1, h=2, bias="head", emask=True, keep=False,
              shift=0.0, seed=0):
    """Random windows (random key subsets in random order) with special rows: row 0 covers the whole key range
    (more than one block of entries when ``nk > 32``), row 1 and the very last row are empty, and with
    ``emask`` row 2 has all its entries masked, row 3 (also the whole key range) its first 32 entries -- one
    kernel block -- and about 15% of the other entries are masked."""
    gen = torch.Generator().manual_seed(seed)
    rows = batch * nq
    counts = torch.randint(0, nk + 1, (rows,), generator=gen)
    counts[0] = nk
    counts[1] = 0
    counts[-1] = 0
    if rows > 3:
        counts[2] = max(int(counts[2]), 3)
        counts[3] = nk
    indptr = torch.zeros(rows + 1, dtype=torch.int64)
    indptr[1:] = counts.cumsum(0)
    key = torch.cat([torch.randperm(nk, generator=gen)[:c] for c in counts.tolist()]).to(torch.int64)
    nnz = key.numel()

    def rounded(*shape, mul=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * mul).to(dtype).double()

    q, g = rounded(batch, heads, nq, dim), rounded(batch, heads, nq, dim)
    k, v = rounded(batch, heads, nk, dim), rounded(batch, heads, nk, dim)
    bv = None
    if bias is not None:
        bv = rounded(h if bias == "head" else 1, nnz, mul=1.5)
        if shift:                                          # large scores: stable only with the max subtracted
            bv[:, indptr[nq]:] += shift
        bv = bv.float()
    em = None
    if emask:
        em = torch.where(torch.rand(h, nnz, generator=gen) < 0.15, NEG, 0.0)
        if rows > 3:
            em[:, indptr[2]:indptr[3]] = NEG                  # a fully masked row
            em[:, indptr[3]:indptr[3] + 32] = NEG             # a whole-range row whose first block is masked
    kp = None
    if keep:
        kp = torch.where(torch.rand(h, nnz, generator=gen) < 0.2, 0.0, 1.25)   # dropout 0.2, exact in any dtype
    return Case(q, k, v, g, indptr, key, bv, em, kp, dim ** -0.5, h0, h)


def reference(c: Case, dtype):
    """Dense window attention of the head block in ``dtype`` (float64: the exact result) and its autograd
    gradients, in the kernels' layouts: out [h, B*Q, D], lse [h, B*Q], dq [h, B*Q, D], dk / dv [B, h, K, D],
    db [h, nnz]."""
    nb, heads, nq, nk, dim = c.dims
    h, blk = c.h, slice(c.h0, c.h0 + c.h)
    nnz = c.key.numel()
    qb, kb, vb = (t[:, blk].to(dtype).requires_grad_() for t in (c.q, c.k, c.v))
    zero = torch.zeros(h, nnz, dtype=dtype)
    zb = (zero + c.bvals.to(dtype) if c.bvals is not None else zero).requires_grad_()   # per-head: dL/ds
    add = zb + (c.emask.to(dtype) if c.emask is not None else 0.0)
    rows = torch.repeat_interleave(torch.arange(nb * nq), c.indptr.diff())
    idx = ((rows // nq)[:, None], torch.arange(h)[None, :], (rows % nq)[:, None], c.key[:, None])
    mask = torch.full((nb, h, nq, nk), NEG, dtype=dtype).index_put(idx, add.t())
    s = c.scale * qb @ kb.transpose(-1, -2) + mask
    lse = torch.logsumexp(s, -1)
    dead = torch.isneginf(lse)[..., None]
    p = torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if c.keep is not None:
        p = p * torch.ones(nb, h, nq, nk, dtype=dtype).index_put(idx, c.keep.to(dtype).t())
    out = p @ vb
    dq, dk, dv, db = torch.autograd.grad(out, (qb, kb, vb, zb), c.g[:, blk].to(dtype))

    def rowwise(t):
        return t.transpose(0, 1).reshape((h, nb * nq) + t.shape[3:]).double()

    return dict(out=rowwise(out.detach()), lse=rowwise(lse.detach()), dq=rowwise(dq), dk=dk.double(),
                dv=dv.double(), db=db.double())


def run_kernels(c: Case, dtype):
    """Forward and backward through the kernels, with strided ``out`` / ``lse`` / ``dq`` / ``go`` / ``db`` views and
    pre-filled gradients (checking that the kernels overwrite / add where they should and nothing else)."""
    nb, heads, nq, nk, dim = c.dims
    h, h0, blk = c.h, c.h0, slice(c.h0, c.h0 + c.h)
    nnz, rows = c.key.numel(), nb * nq
    dev = DEVICE
    q, k, v = (t.to(dtype).to(dev) for t in (c.q, c.k, c.v))
    g = c.g.float().to(dev)
    indptr, key = c.indptr.to(dev), c.key.to(dev)
    bv, em, kp = (None if t is None else t.to(dev) for t in (c.bvals, c.emask, c.keep))

    out_buf = torch.full((h, rows, dim + 3), float("nan"), device=dev)
    lse_buf = torch.full((h, rows + 2), float("nan"), device=dev)
    out, lse = out_buf[..., :dim], lse_buf[:, :rows]
    tw.window_attention_forward(q, k, v, indptr, key, bv, em, kp, c.scale, h0, out, lse)
    assert out_buf[..., dim:].isnan().all() and lse_buf[:, rows:].isnan().all()

    go_buf = torch.zeros(h, rows + 1, device=dev)
    go = go_buf[:, :rows]
    go.copy_((g[:, blk].transpose(0, 1).reshape(h, rows, dim) * out).sum(-1))
    gen = torch.Generator().manual_seed(99)
    dq_buf = torch.randn(h, rows, dim + 3, generator=gen).to(dev)
    dq = dq_buf[..., :dim]
    dq_before = dq_buf.clone()
    dk, dv = (torch.randn(nb, heads, nk, dim, generator=gen).to(dtype).to(dev) for _ in range(2))
    if dtype != torch.float32:       # low precision: the block's heads start at 0 (no rounding of a sum)
        dk[:, blk] = 0
        dv[:, blk] = 0
    dk_before, dv_before = dk.clone(), dv.clone()
    db_buf = torch.full((h, nnz + 4), float("nan"), device=dev)
    db = db_buf[:, :nnz]
    tw.window_attention_backward(q, k, v, indptr, key, bv, em, kp, c.scale, h0, g, go, lse, dq, dk, dv, db)
    assert torch.equal(dq_buf[..., dim:], dq_before[..., dim:]) and db_buf[:, nnz:].isnan().all()
    others = [i for i in range(heads) if not c.h0 <= i < c.h0 + c.h]
    assert torch.equal(dk[:, others], dk_before[:, others]) and torch.equal(dv[:, others], dv_before[:, others])
    assert dk.dtype == dv.dtype == dtype
    return dict(out=out.double().cpu(), lse=lse.double().cpu(),
                dq=(dq.double() - dq_before[..., :dim].double()).cpu(),
                dk=(dk[:, blk].double() - dk_before[:, blk].double()).cpu(),
                dv=(dv[:, blk].double() - dv_before[:, blk].double()).cpu(), db=db.double().cpu())


def check_lse(exact, got):
    """Identical -inf rows (empty or fully masked windows); returns both with those rows zeroed."""
    dead = torch.isneginf(exact)
    assert torch.equal(torch.isneginf(got), dead), "rows with lse = -inf differ"
    assert torch.isfinite(got[~dead]).all()
    return exact.masked_fill(dead, 0.0), got.masked_fill(dead, 0.0)


def assert_close_fp32(exact, fast):
    exact["lse"], fast["lse"] = check_lse(exact["lse"], fast["lse"])
    for name, e in exact.items():
        f = fast[name]
        assert torch.isfinite(f).all(), name
        size = float(e.abs().max())
        err = float((f - e).abs().max())
        assert err <= 1e-5 * size + 1e-12, (name, err, size)


def assert_within_drift(exact, naive, fast, dtype):
    """Each result within twice the drift of the dense computation in the same dtype from the float64 one (the
    drift being at least one rounding step of the largest element, ``eps * max|exact|``), plus 1e-5 of it."""
    eps = torch.finfo(dtype).eps
    exact["lse"], fast["lse"] = check_lse(exact["lse"], fast["lse"])
    naive["lse"] = naive["lse"].masked_fill(torch.isneginf(naive["lse"]), 0.0)
    for name, e in exact.items():
        n, f = naive[name], fast[name]
        assert torch.isfinite(f).all(), name
        size = float(e.abs().max())
        drift = max(float((n - e).abs().max()), eps * size)
        err = float((f - e).abs().max())
        assert err <= 2 * drift + 1e-5 * size, (name, err, drift, size)


# ---- tests -----------------------------------------------------------------------------------------------------

CONFIGS = {
    # per-head bias + mask, a strict head block in the middle, two entry blocks in the whole-range row
    "head_bias": dict(heads=4, nq=20, nk=60, dim=16, h0=1, h=2, bias="head", emask=True, keep=False),
    # shared bias ([1, nnz], read by two heads), mask and dropout, D not a power of two, the last two heads
    "shared_bias_dropout": dict(heads=3, nq=16, nk=45, dim=24, h0=1, h=2, bias="shared", emask=True, keep=True),
    # neither bias nor mask (empty rows still), dropout, all heads
    "plain_dropout": dict(heads=2, nq=10, nk=50, dim=64, h0=0, h=2, bias=None, emask=False, keep=True),
    # D = 1, per-head bias, mask and dropout, the last two of four heads
    "dim1": dict(heads=4, nq=8, nk=33, dim=1, h0=2, h=2, bias="head", emask=True, keep=True),
}


@active
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_window_kernels_match_dense_reference(dtype, config):
    c = make_case(dtype, seed=list(CONFIGS).index(config), **CONFIGS[config])
    exact = reference(c, torch.float64)
    fast = run_kernels(c, dtype)
    if dtype == torch.float32:
        assert_close_fp32(exact, fast)
    else:
        assert_within_drift(exact, reference(c, dtype), fast, dtype)


@active
def test_large_scores_are_stable():
    """Scores around 100 in the second batch element: exp would overflow float32 without the running max."""
    c = make_case(torch.float32, heads=2, nq=6, nk=40, dim=16, h0=0, h=2, bias="head", emask=True, keep=True,
                  shift=100.0, seed=7)
    exact = reference(c, torch.float64)
    assert float(exact["lse"][:, 6:].nan_to_num(neginf=200).min()) > 80
    assert_close_fp32(exact, run_kernels(c, torch.float32))


@active
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fully_masked_block_gives_zeros(dtype):
    """Every entry masked: lse = -inf everywhere, zero output, zero gradients, no NaN."""
    c = make_case(dtype, heads=2, nq=5, nk=20, dim=16, h0=1, h=1, bias="shared", emask=True, keep=True, seed=3)
    c.emask.fill_(NEG)
    fast = run_kernels(c, dtype)
    assert torch.isneginf(fast["lse"]).all()
    for name in ("out", "dq", "dk", "dv", "db"):
        assert torch.equal(fast[name], torch.zeros_like(fast[name])), name


def test_no_entries_launches_nothing(monkeypatch):
    """nnz == 0 or B*Q == 0: no launch (runs without the interpreter too); lse = -inf, out = 0, gradients as given."""
    def fail():
        raise AssertionError("a kernel was launched")
    monkeypatch.setattr(tw, "_kernels", fail)
    q, k = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8)
    indptr, key = torch.zeros(9, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    out_buf, lse = torch.full((2, 8, 10), float("nan")), torch.zeros(2, 8)
    tw.window_attention_forward(q, k, k, indptr, key, None, None, None, 0.5, 1, out_buf[..., :8], lse)
    assert torch.isneginf(lse).all() and (out_buf[..., :8] == 0).all() and out_buf[..., 8:].isnan().all()
    dq, dk, dv = torch.ones(2, 8, 8), torch.ones_like(k), torch.ones_like(k)
    tw.window_attention_backward(q, k, k, indptr, key, None, None, None, 0.5, 1, torch.zeros_like(q), torch.zeros(2, 8),
                                 lse, dq, dk, dv, torch.zeros(2, 0))
    assert (dq == 1).all() and (dk == 1).all() and (dv == 1).all()
    q0 = torch.randn(2, 3, 0, 8)                          # no queries at all
    tw.window_attention_forward(q0, k, k, torch.zeros(1, dtype=torch.int64), key, None, None, None, 0.5, 0,
                                torch.zeros(3, 0, 8), torch.zeros(3, 0))


def test_launch_functions_reject_bad_layouts():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    indptr, key = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 4])
    with pytest.raises(ValueError, match="unit last stride"):
        tw.window_attention_forward(q, k, k, indptr, key, None, None, None, 1.0, 0,
                                    torch.zeros(2, 4, 3).transpose(1, 2), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="contiguous"):
        tw.window_attention_forward(q.transpose(2, 3).contiguous().transpose(2, 3), k, k, indptr, key, None, None,
                                    None, 1.0, 0, torch.zeros(2, 3, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="head block"):
        tw.window_attention_forward(q, k, k, indptr, key, None, None, None, 1.0, 1, torch.zeros(2, 3, 4),
                                    torch.zeros(2, 3))
    with pytest.raises(ValueError, match="indptr"):
        tw.window_attention_forward(q, k, k, indptr[:-1], key, None, None, None, 1.0, 0, torch.zeros(2, 3, 4),
                                    torch.zeros(2, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is only observable on CUDA")
def test_launches_do_not_synchronise():
    c = make_case(torch.float16, heads=2, nq=6, nk=40, dim=16, h0=1, h=1, keep=True, seed=5)
    dev, (nb, heads, nq, nk, dim) = "cuda", c.dims
    q, k, v = (t.half().to(dev) for t in (c.q, c.k, c.v))
    g, indptr, key, bv, em, kp = (t.float().to(dev) if t.is_floating_point() else t.to(dev)
                                  for t in (c.g, c.indptr, c.key, c.bvals, c.emask, c.keep))
    out, lse, go = torch.empty(1, nb * nq, dim, device=dev), torch.empty(1, nb * nq, device=dev), None
    tw.window_attention_forward(q, k, v, indptr, key, bv, em, kp, c.scale, c.h0, out, lse)   # compiled outside the check
    go = (g[:, 1:2].transpose(0, 1).reshape(1, nb * nq, dim) * out).sum(-1)
    grads = (torch.zeros(1, nb * nq, dim, device=dev), torch.zeros_like(k), torch.zeros_like(v),
             torch.empty(1, key.numel(), device=dev))
    tw.window_attention_backward(q, k, v, indptr, key, bv, em, kp, c.scale, c.h0, g, go, lse, *grads)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tw.window_attention_forward(q, k, v, indptr, key, bv, em, kp, c.scale, c.h0, out, lse)
        tw.window_attention_backward(q, k, v, indptr, key, bv, em, kp, c.scale, c.h0, g, go, lse, *grads)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@active
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_first_use_self_check_passes_and_auto_picks_triton(dtype):
    """The window-attention self-check of `sparse_bias._core.selfcheck` (key padding, per-head bias, the modules' layouts)
    passes for the Triton kernels in every dtype, and `auto` then takes them (as on CUDA)."""
    import sparse_bias as sb
    from sparse_bias._core import selfcheck
    selfcheck.reset_self_checks()
    ok, detail = selfcheck.self_check("triton", torch.device(DEVICE), dtype, 16, "window")
    assert ok, detail
    if DEVICE == "cuda":
        assert sb.select_window_backend(torch.zeros(1, 1, 1, 16, device="cuda", dtype=dtype))[0] == "triton"
