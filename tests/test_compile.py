"""torch.compile(fullgraph=True) through the library's custom ops (docs/gpu.md).

Each entry point is traced in one graph, forward and backward, and equals eager; window indexes of different sizes
(``nnz``) reuse the graph (dynamo's counters: one graph, no recompile). The aot_eager backend checks the fake
implementations and the registered autograd cheaply; one inductor run per entry checks the generated code against
the fake shapes and strides.
"""
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import sparse_bias as sb
from sparse_bias._core import compat as _compat
from sparse_bias.nn import AQRWeightGenerator, PETRTransformerDecoderLayer, SparseBiasMultiheadAttention
from helpers import needs_custom_ops, skip_missing

pytestmark = needs_custom_ops

LAYOUT = sb.KeyLayout(bev_shape=(10, 12), cam_shape=(2, 5, 8))
B, Q, H, D, C = 2, 12, 4, 8, 16


def windows(seed, layout=LAYOUT, bev_window=5, cam_window=3):
    g = torch.Generator().manual_seed(seed)
    bev = torch.stack([torch.randint(0, layout.bev_shape[0], (B, Q), generator=g),
                       torch.randint(0, layout.bev_shape[1], (B, Q), generator=g)], -1)
    cam = torch.stack([torch.randint(0, 2, (B, Q), generator=g), torch.randint(0, 5, (B, Q), generator=g),
                       torch.randint(0, 8, (B, Q), generator=g)], -1)[:, :, None]
    return sb.local_windows(layout, bev, cam, bev_window, cam_window)


def leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Q, LAYOUT.num_keys, LAYOUT.num_keys))
    wb, wc = (torch.randn(B, Q, H, generator=g) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v, wb, wc)]


def compare_compiled(fn, inputs_per_call, params, backend="aot_eager"):
    """Compile ``fn`` with fullgraph, run it on each input set, compare output and gradients (of ``params``) with
    eager; returns the number of graphs dynamo built."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    for args in inputs_per_call:
        out = compiled(*args)
        ref = fn(*args)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        got = torch.autograd.grad(out.square().sum(), params)
        want = torch.autograd.grad(ref.square().sum(), params)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    return counters["stats"]["unique_graphs"]


KPM = torch.zeros(B, LAYOUT.num_keys, dtype=torch.bool)
KPM[1, -7:] = True


@pytest.mark.parametrize("backend", ["auto", "sparse", "scatter", "torch"])
def test_window_bias_and_sparse_bias_attention(backend):
    skip_missing(backend, torch.float32) if backend != "auto" else None
    q, k, v, wb, wc = leaves()

    def fn(q, k, v, win, wb, wc):
        return sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc, profile="gaussian"),
                                        key_padding_mask=KPM, backend=backend)
    calls = [(q, k, v, windows(s), wb, wc) for s in range(3)]
    assert len({c[3].nnz for c in calls}) == 3                     # three sizes
    assert compare_compiled(fn, calls, (q, k, v, wb, wc)) == 1     # one graph: nnz is dynamic


@pytest.mark.parametrize("backend", ["auto", "sparse", "scatter", "torch"])
def test_window_attention(backend):
    skip_missing(backend, torch.float32) if backend != "auto" else None
    q, k, v, wb, wc = leaves()

    def fn(q, k, v, win, wb, wc):
        return sb.window_attention(q, k, v, win, sb.window_bias(win, wb, wc), key_padding_mask=KPM, backend=backend)
    calls = [(q, k, v, windows(s), wb, wc) for s in range(3)]
    assert compare_compiled(fn, calls, (q, k, v, wb, wc)) == 1


def test_dropout_draws_a_seed_per_call_inside_the_graph():
    """A compiled graph with dropout does not freeze the seed: two calls drop differently; a given seed is eager's."""
    q, k, v, wb, wc = leaves()
    win = windows(0)

    def fn(q, k, v, wb, wc, seed=None):
        return sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc), dropout_p=0.3, dropout_seed=seed)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, b = compiled(q, k, v, wb, wc), compiled(q, k, v, wb, wc)
    assert not torch.equal(a, b)
    torch.testing.assert_close(torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v, wb, wc, 7),
                               fn(q, k, v, wb, wc, 7))


@pytest.mark.parametrize("local", [False, True])
def test_module(local):
    torch.manual_seed(0)
    mha = SparseBiasMultiheadAttention(C, H).eval()
    query = torch.randn(Q, B, C, requires_grad=True)
    memory = torch.randn(LAYOUT.num_keys, B, C, requires_grad=True)
    _, _, _, wb, wc = leaves()

    def fn(query, memory, win, wb, wc):
        extra = dict(local_window=win) if local else {}
        return mha(query, memory, memory, key_padding_mask=KPM, attention_bias=sb.window_bias(win, wb, wc),
                   key_pos=memory, **extra)
    calls = [(query, memory, windows(s), wb, wc) for s in range(3)]
    assert compare_compiled(fn, calls, (query, memory, wb, wc) + tuple(mha.parameters())) == 1


def test_petr_decoder_layer_with_the_aqr():
    """The AQR's weights (its window-attention encoder over the LAM, then the weight head) and a PETR decoder layer
    whose cross-attention takes the window bias built from them: one graph, forward and backward."""
    torch.manual_seed(0)
    aqr = AQRWeightGenerator(C, layout=LAYOUT, window_sizes=[3, 5]).eval()
    layer = PETRTransformerDecoderLayer(C, H, 32, operation_order=("cross_attn", "norm", "ffn", "norm")).eval()
    query_embed = torch.randn(Q, B, C, requires_grad=True)
    memory = torch.randn(LAYOUT.num_keys, B, C, requires_grad=True)
    pos = torch.randn(LAYOUT.num_keys, B, C)

    def fn(query_embed, memory, win):
        lidar, camera = aqr.weights(query_embed, memory, pos, win, key_padding_mask=KPM)
        bias = sb.window_bias(win, lidar, camera)
        return layer(torch.zeros_like(query_embed), memory, memory, query_pos=query_embed, key_pos=pos,
                     key_padding_mask=KPM, attention_bias=bias)
    calls = [(query_embed, memory, windows(s)) for s in range(3)]
    params = (query_embed, memory) + tuple(aqr.parameters()) + tuple(layer.parameters())
    params = tuple(p for p in params if p.requires_grad)
    assert compare_compiled(fn, calls, params) == 1


def test_inductor():
    """The generated code agrees with the fake shapes and strides the ops declare (forward and backward)."""
    q, k, v, wb, wc = leaves()

    def fn(q, k, v, win, wb, wc):
        bias = sb.window_bias(win, wb, wc)
        return sb.sparse_bias_attention(q, k, v, bias, key_padding_mask=KPM) + \
            sb.window_attention(q, k, v, win, bias, key_padding_mask=KPM)
    calls = [(q, k, v, windows(s), wb, wc) for s in range(2)]
    assert compare_compiled(fn, calls, (q, k, v, wb, wc), backend="inductor") == 1


def test_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration of the forward ops."""
    q, k, v, wb, wc = (t.detach() for t in leaves())
    win = windows(0)
    values = sb.window_bias(win, wb, wc).values.detach()
    from sparse_bias._core.call import Call
    mask, scale, dropout_p, seed = Call.of(q, D ** -0.5).as_args()
    index = win.entries().as_args()
    for op, backend in ((torch.ops.sparse_bias.sparse_attention, "sparse"),
                        (torch.ops.sparse_bias.window_attention, "torch")):
        args = (q, k, v, values, index, mask, scale, dropout_p, seed, backend)
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))
    modality = torch.randn(B, Q, 2, dtype=q.dtype)
    args = (q, k, v, modality, [0, LAYOUT.num_bev_keys, LAYOUT.num_bev_keys, LAYOUT.num_keys], mask, scale, dropout_p, seed)
    torch.library.opcheck(torch.ops.sparse_bias.modality_attention, args)


def test_export():
    """torch.export of the attention module: the index enters as tensors (a `WindowIndex` is built from them in the
    exported forward; an exported program trusts them -- validate an index before feeding it) and nnz is dynamic."""
    if not (_compat.EXPORT_FLAG or hasattr(torch._dynamo, "is_exporting")):
        pytest.skip("this torch cannot tell an export trace (no torch.compiler.is_exporting: 2.5+)")
    torch.manual_seed(0)

    class Exported(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = SparseBiasMultiheadAttention(C, H)

        def forward(self, query, memory, wb, wc, indptr, key, source, dy, dx):
            win = sb.WindowIndex(LAYOUT, B, Q, indptr, key, source, dy, dx)
            return self.mha(query, memory, memory, key_padding_mask=KPM,
                            attention_bias=sb.window_bias(win, wb, wc))

    module = Exported().eval()

    def args(win):
        return (torch.randn(Q, B, C, generator=torch.Generator().manual_seed(1)),
                torch.randn(LAYOUT.num_keys, B, C, generator=torch.Generator().manual_seed(2)),
                torch.randn(B, Q), torch.randn(B, Q), win.indptr, win.key, win.source, win.dy, win.dx)
    first, second = windows(0), windows(1, bev_window=3, cam_window=5)
    assert first.nnz != second.nnz
    program = torch.export.export(module, args(first))
    assert "torch.ops.sparse_bias.sparse_attention" in program.graph_module.code
    for win in (first, second):
        a = args(win)
        torch.testing.assert_close(program.module()(*a), module(*a))


def test_compile_benchmark_quick(capsys):
    """benchmarks/compile_benchmark.py runs (tiny sizes, aot_eager) and checks compiled against eager itself."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "compile_benchmark.py"
    spec = importlib.util.spec_from_file_location("compile_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    med = module.main(["--quick"])
    assert set(med) == {"eager", "compiled"} and "compiled / eager" in capsys.readouterr().out


def test_indexes_used_eagerly_first_reuse_the_graph():
    """An index used eagerly before the compiled call (its cached per-index tensors then exist) still shares the one
    graph: every cached ``nnz``-long tensor is marked dynamic (regression: one recompile, "win.key size mismatch")."""
    q, k, v, wb, wc = leaves()

    def fn(q, k, v, win, wb, wc):
        return sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc), key_padding_mask=KPM, backend="torch")
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for s in range(3):
        win = windows(s)
        ref = fn(q, k, v, win, wb, wc)
        torch.testing.assert_close(compiled(q, k, v, win, wb, wc), ref)
    assert counters["stats"]["unique_graphs"] == 1
