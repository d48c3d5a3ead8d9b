"""No host synchronisation inside an attention call (docs/gpu.md "No host sync, torch.compile, CUDA graphs").

A `sparse_bias.count_host_syncs` dispatch mode counts the aten ops that make a GPU host wait (``.item()`` /
``bool(tensor)`` = ``_local_scalar_dense``, ``nonzero``, ``unique``, ``masked_select``, ``bincount``, ``equal``,
``is_nonzero``, ``repeat_interleave`` without ``output_size``) -- on CPU tensors, where the same aten ops reach the
dispatcher -- including inside the library's own custom ops. Every entry point, forward + backward, second call
(the index already built, first-use self-checks done), on every backend that runs on CUDA: zero. The Triton backend
runs under the interpreter in a subprocess.
"""
import json
import os

import pytest
import torch

import sparse_bias as sb
from sparse_bias._core import correction as _sparse_function
from sparse_bias.backends.triton import TRITON_AVAILABLE
from sparse_bias.nn import PETRTransformerDecoderLayer, SparseBiasMultiheadAttention
from helpers import run_python, skip_missing

LAYOUT = sb.KeyLayout(bev_shape=(12, 12), cam_shape=(2, 6, 8))
B, Q, H, D, C = 2, 20, 4, 16, 16
GPU_BACKENDS = ["sparse", "scatter", "torch"]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def scene(seed=0, exact=False, dtype=torch.float32):
    """A small CMT-like scene: windows on the BEV grid and the camera views, padded keys, per-head weights. With
    ``exact``, queries 1 and 4 of each sample look at their window keys under a strongly negative bias: their
    normaliser cancels and they take the exact-row path."""
    g = torch.Generator().manual_seed(seed)
    bev = torch.stack([torch.randint(0, 12, (B, Q), generator=g), torch.randint(0, 12, (B, Q), generator=g)], -1)
    cam = torch.stack([torch.randint(0, 2, (B, Q), generator=g), torch.randint(0, 6, (B, Q), generator=g),
                       torch.randint(0, 8, (B, Q), generator=g)], -1)[:, :, None]
    win = sb.local_windows(LAYOUT, bev, cam, 5, 3)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (Q, LAYOUT.num_keys, LAYOUT.num_keys))
    wb, wc = (torch.randn(B, Q, H, generator=g, dtype=dtype) for _ in range(2))
    if exact:
        for b in range(B):
            for i in (1, 4):
                keys = win.key[int(win.indptr[b * Q + i]):int(win.indptr[b * Q + i + 1])]
                q[b, :, i] = 16 * k[b, :, keys].mean(1)
                wb[b, i] = wc[b, i] = -12.0
    kpm = torch.zeros(B, LAYOUT.num_keys, dtype=torch.bool)
    kpm[1, -9:] = True
    return win, [t.requires_grad_() for t in (q, k, v, wb, wc)], kpm


def entry(name, backend, win, leaves, kpm, dropout_p=0.0):
    q, k, v, wb, wc = leaves
    if name == "sparse_bias_attention":
        return sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc), key_padding_mask=kpm, backend=backend,
                                        dropout_p=dropout_p)
    if name == "window_attention":
        return sb.window_attention(q, k, v, win, sb.window_bias(win, wb, wc), key_padding_mask=kpm, backend=backend,
                                   dropout_p=dropout_p)
    if name == "plain":
        return sb.sparse_bias_attention(q, k, v, None, key_padding_mask=kpm, dropout_p=dropout_p)
    assert name == "modality"
    bias = sb.ModalityBias(LAYOUT, torch.stack([wb, wc], 2))
    return sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=kpm, dropout_p=dropout_p)


def syncs_of(fn):
    """Host syncs of the second run of ``fn`` (forward + backward), as ``{op: count}``."""
    fn().sum().backward()
    with sb.count_host_syncs() as syncs:
        fn().sum().backward()
    return dict(syncs.ops)


ENTRIES = [("sparse_bias_attention", b) for b in GPU_BACKENDS] + [("window_attention", b) for b in GPU_BACKENDS] \
    + [("plain", "auto"), ("modality", "auto")]


def test_the_counter_sees_syncs():
    with sb.count_host_syncs() as syncs:
        torch.ones(3).sum().item()
        bool(torch.ones(1))
        torch.arange(3).nonzero()
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([1, 2]), output_size=3)   # not counted
        torch.equal(torch.ones(2), torch.ones(2))
    assert syncs.ops == {"_local_scalar_dense": 2, "nonzero": 1, "repeat_interleave": 1, "equal": 1}, syncs.ops


@pytest.mark.parametrize("name, backend", ENTRIES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_no_host_sync(name, backend, dropout_p):
    skip_missing(backend, torch.float32) if backend != "auto" else None
    win, leaves, kpm = scene()
    assert syncs_of(lambda: entry(name, backend, win, leaves, kpm, dropout_p)) == {}


@pytest.mark.parametrize("backend", GPU_BACKENDS + ["fused"])
def test_no_host_sync_in_the_exact_row_regime(backend, monkeypatch):
    """Rows whose correction would cancel are evaluated densely, counted from CPU memory on CPU tensors (on a GPU
    the Triton kernels decide on the device, `test_no_host_sync_with_triton_under_the_interpreter`): zero syncs,
    and exact."""
    skip_missing(backend, torch.float64)
    win, leaves, kpm = scene(exact=True, dtype=torch.float64)
    seen = []
    original = _sparse_function.flagged_rows
    monkeypatch.setattr(_sparse_function, "flagged_rows", lambda *a: seen.append(original(*a)) or seen[-1])
    assert syncs_of(lambda: entry("sparse_bias_attention", backend, win, leaves, kpm)) == {}
    assert {1, 4} <= set(seen[-1].nonzero()[:, 1].tolist())                  # queries 1 and 4 cancel
    q, k, v, wb, wc = leaves
    out = entry("sparse_bias_attention", backend, win, leaves, kpm)
    ref = sb.dense_bias_attention(q, k, v, sb.window_bias(win, wb, wc).to_dense(), key_padding_mask=kpm)
    got = torch.autograd.grad(out.square().sum(), leaves)
    want = torch.autograd.grad(ref.square().sum(), leaves)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("local", [False, True])
def test_no_host_sync_in_the_modules(backend, local):
    """SparseBiasMultiheadAttention (training, dropout) and a PETR decoder layer with the AQR's window bias or its
    local window (LAM)."""
    skip_missing(backend, torch.float32)
    torch.manual_seed(0)
    win, (_, _, _, wb, wc), kpm = scene()
    mha = SparseBiasMultiheadAttention(C, H, attn_drop=0.1, backend=backend).train()
    layer = PETRTransformerDecoderLayer(C, H, 32, operation_order=("cross_attn", "norm", "ffn", "norm"),
                                        backend=backend).train()
    query = torch.randn(Q, B, C, requires_grad=True)
    memory = torch.randn(LAYOUT.num_keys, B, C, requires_grad=True)
    extra = dict(local_window=win) if local else {}

    def run_mha():
        return mha(query, memory, memory, key_padding_mask=kpm, attention_bias=sb.window_bias(win, wb, wc), **extra)

    def run_layer():
        return layer(torch.zeros_like(query), memory, memory, query_pos=query, key_padding_mask=kpm,
                     attention_bias=sb.window_bias(win, wb, wc), **extra)
    assert syncs_of(run_mha) == {}
    assert syncs_of(run_layer) == {}


def test_debug_checks_do_synchronise():
    """The debug switch is where device-value checks went: it reads values (and says so by raising)."""
    win, leaves, kpm = scene()
    sb.set_debug_checks(True)
    try:
        syncs = syncs_of(lambda: entry("sparse_bias_attention", "sparse", win, leaves, kpm))
    finally:
        sb.set_debug_checks(False)
    assert syncs.get("_local_scalar_dense", 0) > 0


# ---- Triton, under the interpreter -------------------------------------------------------------------------

@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed (extra: triton)")
@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs in a subprocess")
def test_no_host_sync_with_triton_under_the_interpreter():
    import importlib.util
    if importlib.util.find_spec("numpy") is None or importlib.util.find_spec("triton.runtime.interpreter") is None:
        pytest.skip("this triton has no CPU interpreter, or numpy (which the interpreter needs) is missing")
    code = f"""
import json, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
import test_host_sync as t
t.Q, t.H = 6, 2                                        # the interpreter runs every program of the exact-row kernels
res = {{}}
for name in ("sparse_bias_attention", "window_attention"):
    for p in (0.0, 0.1):
        win, leaves, kpm = t.scene()
        res[f"{{name}} {{p}}"] = t.syncs_of(lambda: t.entry(name, "triton", win, leaves, kpm, p))
win, leaves, kpm = t.scene(exact=True)                 # exact rows: the Triton kernels decide on the device
res["exact rows"] = t.syncs_of(lambda: t.entry("sparse_bias_attention", "triton", win, leaves, kpm))
print(json.dumps(res))
"""
    # the first-use self-checks (a sync each, once, outside the counted calls) are tested in test_self_check.py;
    # under the interpreter they would take minutes
    out = run_python(code, TRITON_INTERPRET="1", SPARSE_BIAS_SELF_CHECK="off")
    res = json.loads(out.strip().splitlines()[-1])
    assert res and all(v == {} for v in res.values()), res


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["triton"] + GPU_BACKENDS)
def test_no_host_sync_on_cuda(backend):
    """On a GPU: torch's own sync detector agrees (``set_sync_debug_mode("error")`` raises on a synchronising op)."""
    win, leaves, kpm = scene()
    win = win.cuda()
    leaves = [t.detach().cuda().requires_grad_() for t in leaves]
    kpm = kpm.cuda()
    for name in ("sparse_bias_attention", "window_attention"):
        entry(name, backend, win, leaves, kpm).sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            entry(name, backend, win, leaves, kpm).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["sparse_bias_attention", "window_attention"])
@pytest.mark.parametrize("backend", ["triton"] + GPU_BACKENDS)
def test_cuda_graph_capture(name, backend):
    """A forward + backward captured in a CUDA graph and replayed equals the eager step (the index built, the
    first-use checks done before capture, a fixed dropout-free call)."""
    win, leaves, kpm = scene()
    win, kpm = win.cuda(), kpm.cuda()
    leaves = [t.detach().cuda().requires_grad_() for t in leaves]

    def step():
        for t in leaves:
            t.grad = None
        out = entry(name, backend, win, leaves, kpm)
        out.square().sum().backward()
        return out
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()                                   # warm up: first-use checks, kernel compilation, caches
    torch.cuda.current_stream().wait_stream(side)
    want = [step().detach().clone()] + [t.grad.clone() for t in leaves]
    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph):
        out = entry(name, backend, win, leaves, kpm)
        out.square().sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip([out] + [t.grad for t in leaves], want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
