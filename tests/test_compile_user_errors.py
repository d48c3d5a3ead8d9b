"""Index building meets torch.inference_mode and torch.compile as a user combines them (docs/limitations.md).

An index (and a bias) made under ``torch.inference_mode()`` trains; a forward that builds its index inside a default
``torch.compile`` breaks the graph at the index building, without a warning, and equals eager; ``fullgraph=True``
around the index building names the limitation; biases of different window sizes share one compiled graph.
"""
import logging
import subprocess
import sys
import warnings

import pytest
import torch

import sparse_bias as sb
from sparse_bias._core import compat as _compat
from helpers import needs_custom_ops, skip_without_dynamo

LAYOUT = sb.KeyLayout(bev_shape=(6, 7), cam_shape=(2, 4, 5))
B, Q, H, D = 2, 5, 2, 8

needs_not_traced = pytest.mark.skipif(_compat._LAZY_DISABLE is None,
                                      reason="this torch has no lazy torch.compiler.disable (torch._compile, 2.1+)")


def positions(seed):
    g = torch.Generator().manual_seed(seed)
    bev = torch.stack([torch.randint(0, 6, (B, Q), generator=g), torch.randint(0, 7, (B, Q), generator=g)], -1)
    cam = torch.stack([torch.randint(0, 2, (B, Q), generator=g), torch.randint(0, 4, (B, Q), generator=g),
                       torch.randint(0, 5, (B, Q), generator=g)], -1)
    bev[0, 1] = -1                                               # a query without a BEV window
    return bev, cam


def leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Q, LAYOUT.num_keys, LAYOUT.num_keys))
    wb, wc = (torch.randn(B, Q, generator=g) for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v, wb, wc)]


def train_step(win, entry, bias=None):
    """Output and gradients (q, k, v and, with the bias made here, the weights) of one attention call on ``win``."""
    q, k, v, wb, wc = leaves()
    params = (q, k, v) if bias is not None else (q, k, v, wb, wc)
    bias = sb.window_bias(win, wb, wc, profile="gaussian") if bias is None else bias
    if entry == "window_attention":
        out = sb.window_attention(q, k, v, win, bias)
    else:
        out = sb.sparse_bias_attention(q, k, v, bias)
    return [out] + list(torch.autograd.grad(out.square().sum(), params))


def assert_same(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- torch.inference_mode ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["sparse_bias_attention", "window_attention"])
def test_index_built_under_inference_mode_trains(entry):
    """torch refuses to save inference tensors for backward; the index swaps them for normal copies once."""
    bev, cam = positions(0)
    with torch.inference_mode():
        frozen = sb.local_windows(LAYOUT, bev, cam, 3, 5)
    assert frozen.key.is_inference()
    want = train_step(sb.local_windows(LAYOUT, bev, cam, 3, 5), entry)
    assert_same(train_step(frozen, entry), want)
    assert not any(t.is_inference() for t in (frozen.indptr, frozen.key, frozen.source, frozen.dy, frozen.dx))
    with sb.count_host_syncs() as syncs:                # still validated: the swap read no value
        frozen.validate()
    assert syncs.total == 0
    assert_same(train_step(frozen, entry), want)        # and again


def test_index_first_used_under_inference_mode_then_trains():
    """An evaluation pass under inference mode derives the index's cached structures; training afterwards works."""
    bev, cam = positions(1)
    win = sb.local_windows(LAYOUT, bev, cam, 3, 3)
    q, k, v, wb, wc = leaves()
    with torch.inference_mode():
        sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc, profile="gaussian"))
        sb.window_attention(q, k, v, win)
    for entry in ("sparse_bias_attention", "window_attention"):
        assert_same(train_step(win, entry), train_step(sb.local_windows(LAYOUT, bev, cam, 3, 3), entry))


@pytest.mark.parametrize("kind", ["sparse", "modality"])
def test_bias_made_under_inference_mode_trains_the_attention(kind):
    """A fixed bias computed once under inference mode, then used while q, k, v train."""
    bev, cam = positions(2)
    g = torch.Generator().manual_seed(5)
    wb, wc = torch.randn(B, Q, generator=g), torch.randn(B, Q, generator=g)

    def make():
        if kind == "modality":
            return sb.ModalityBias(LAYOUT, torch.stack([wb, wc], dim=-1) * 1.0)
        return sb.window_bias(sb.local_windows(LAYOUT, bev, cam, 3, 3), wb, wc)
    with torch.inference_mode():
        frozen = make()
    assert frozen.values.is_inference()
    win = frozen.index if kind == "sparse" else sb.local_windows(LAYOUT, bev, cam, 3, 3)
    assert_same(train_step(win, "sparse_bias_attention", frozen), train_step(win, "sparse_bias_attention", make()))


# --- torch.compile ------------------------------------------------------------------------------------------------

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.texts = []

    def emit(self, record):
        self.texts.append(f"{record.pathname}: {record.getMessage()}")


class BuildsItsIndex(torch.nn.Module):
    """A forward that projects nothing but builds its window index from the cells it is given, as CMT's decoder
    does once per step."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(D, D)

    def forward(self, q, k, v, bev, cam, wb, wc):
        win = sb.local_windows(LAYOUT, bev, cam, 3, 3)
        return sb.sparse_bias_attention(self.proj(q), k, v, sb.window_bias(win, wb, wc)) * 2


@needs_custom_ops
@needs_not_traced
def test_default_compile_builds_the_index_without_warnings():
    """No warning (log record or Python warning) pointing at the library, the eager result and gradients, and
    positions of other sizes (other nnz) reuse the compiled graphs."""
    skip_without_dynamo()
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = BuildsItsIndex()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager")
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("torch", "torch._dynamo")]    # dynamo's does not propagate
    for logger in loggers:
        logger.addHandler(handler)
    graphs = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for seed in range(3):
                bev, cam = positions(seed)
                q, k, v, wb, wc = leaves(seed)
                params = (q, wb, wc) + tuple(model.parameters())
                out = compiled(q, k, v, bev, cam, wb, wc)
                got = [out] + list(torch.autograd.grad(out.square().sum(), params))
                ref = model(q, k, v, bev, cam, wb, wc)
                want = [ref] + list(torch.autograd.grad(ref.square().sum(), params))
                for a, b in zip(got, want):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
                graphs.append(counters["stats"]["unique_graphs"])
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    noisy = [t for t in handler.texts if "sparse_bias" in t and "graph" in t.lower()]
    noisy += [str(w.message) for w in caught if "sparse_bias" in (w.filename + str(w.message))]
    assert not noisy, noisy[:3]
    assert graphs[0] == graphs[-1], graphs                  # no recompile for positions of other sizes


@needs_not_traced
@pytest.mark.parametrize("what", ["local_windows", "project_points"])
def test_fullgraph_around_index_building_names_the_limitation(what):
    skip_without_dynamo()
    import torch._dynamo
    bev, cam = positions(0)
    if what == "local_windows":
        def fn(bev, cam):
            return sb.local_windows(LAYOUT, bev, cam, 3, 3).key.float().sum()
        args = (bev, cam)
    else:
        def fn(ref):
            return sb.project_points(ref, [-50, -50, -5, 50, 50, 3], sb.KeyLayout(bev_shape=(6, 7)))[0].sum()
        args = (torch.rand(B, Q, 3),)
    torch._dynamo.reset()
    with pytest.raises(Exception) as err:
        torch.compile(fn, fullgraph=True, backend="eager")(*args)
    msg = str(err.value)
    # dynamo's refusal to call a torch.compiler.disable()d function, naming it; torch 2.8+ quotes our reason
    assert what in msg and "disable" in msg and "data-dependent expression" not in msg, msg
    if "reason:" in msg:
        assert "before the compiled region and pass" in msg, msg


@needs_custom_ops
def test_biases_of_four_window_sizes_share_one_graph():
    """The bias built outside the compiled call: its values' nnz dimension is dynamic as the index's is."""
    skip_without_dynamo()
    import torch._dynamo
    from torch._dynamo.utils import counters
    q, k, v, wb, wc = leaves()
    bev, cam = positions(3)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(sb.sparse_bias_attention, fullgraph=True, backend="aot_eager")
    sizes = set()
    for window in (1, 3, 5, 7):
        bias = sb.window_bias(sb.local_windows(LAYOUT, bev, cam, window, window), wb, wc)
        sizes.add(bias.index.nnz)
        out = compiled(q, k, v, bias)
        torch.testing.assert_close(out, sb.sparse_bias_attention(q, k, v, bias), rtol=1e-5, atol=1e-6)
    assert len(sizes) == 4
    assert counters["stats"]["unique_graphs"] == 1


def test_index_building_does_not_import_dynamo():
    """Without torch.compile nothing imports torch._dynamo (about a second of import time)."""
    code = ("import sys, torch, sparse_bias as sb\n"
            "win = sb.local_windows(sb.KeyLayout(bev_shape=(4, 4)), torch.tensor([[[1, 1]]]), None, 3)\n"
            "sb.window_bias(win, torch.ones(1, 1)).index.validate()\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"
