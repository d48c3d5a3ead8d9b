"""``torch.library.opcheck`` on every op the library registers, with the arguments the public API produces.

Each case calls a public entry point (`sparse_bias_attention` with a `SparseBias` or `ModalityBias` or no bias,
`window_attention`) forward and backward under a dispatch mode that records every call of a ``sparse_bias`` op
with its arguments; `torch.library.opcheck` then runs all four of its sub-tests (schema, autograd registration,
fake tensor, AOT dispatch with dynamic shapes) on each recorded call. The fast set covers every backend each op
dispatches to once and every argument kind on one backend; ``--slow`` runs the full product.
"""
import itertools
import os
import unittest.mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import sparse_bias as sb
from sparse_bias._core import ops
from sparse_bias._core.compat import CUSTOM_OPS, custom_op_definitions
from helpers import (CORRECTION_BACKENDS, SMALL, WINDOW_BACKENDS, make_case, pytest_under_the_interpreter,
                     random_positions, skip_missing)
from sparse_bias.backends.triton import TRITON_AVAILABLE

pytestmark = pytest.mark.skipif(not (CUSTOM_OPS and hasattr(torch.library, "opcheck")),
                                reason="this torch has no torch.library.custom_op / opcheck (2.4+): nothing is "
                                       "registered")

#: opcheck's four sub-tests, all required
TEST_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
#: the argument kinds a case may combine
VARIANTS = ("shared", "per_head", "key_padding", "strided", "empty_windows", "dropout")


class OpRecorder(TorchDispatchMode):
    """Records ``(op, args, kwargs)`` of every ``sparse_bias`` op called inside it (tensors detached)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "sparse_bias":
            detach = (lambda t: t.detach() if isinstance(t, torch.Tensor) else t)
            self.calls.append((func, tree_map(detach, args), tree_map(detach, kwargs)))
        return func(*args, **kwargs)


def _strided(t):
    """``t`` as a transposed view of a ``[B, N, H, D]`` projection (what the modules pass)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def recorded_calls(entry, backend, variants, dtype=torch.float64):
    """The ``sparse_bias`` op calls of one forward + backward of ``entry`` (``"sparse"``, ``"window"``,
    ``"modality"``, ``"plain"``), made through the registered ops as a compiled graph makes them."""
    win, q, k, v, wb, wc = make_case(SMALL, batch=2, heads=2, queries=6, dim=8, per_head="per_head" in variants,
                                     seed=len(variants), dtype=dtype)
    if "empty_windows" in variants:                   # queries 0 and 3 of each sample see no window key
        bev_pos, cam_pos = random_positions(SMALL, 2, 6, 2, torch.Generator().manual_seed(1), p_missing=0.0)
        bev_pos[:, [0, 3]] = -1
        cam_pos[:, [0, 3]] = -1
        win = sb.local_windows(SMALL, bev_pos, cam_pos, 5, 3)
    if "strided" in variants:
        q, k, v = _strided(q), _strided(k), k.expand_as(v)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, wb, wc)]
    q, k, v, wb, wc = leaves
    kpm = None
    if "key_padding" in variants:
        kpm = torch.zeros(2, SMALL.num_keys, dtype=torch.bool)
        kpm[1, -7:] = True
    kw = dict(key_padding_mask=kpm, dropout_p=0.1 if "dropout" in variants else 0.0)
    with unittest.mock.patch.object(ops, "is_compiling", lambda: True), OpRecorder() as rec:
        if entry == "sparse":
            out = sb.sparse_bias_attention(q, k, v, sb.window_bias(win, wb, wc), backend=backend, **kw)
        elif entry == "window":
            out = sb.window_attention(q, k, v, win, sb.window_bias(win, wb, wc), backend=backend, **kw)
        elif entry == "modality":
            out = sb.sparse_bias_attention(q, k, v, sb.ModalityBias(SMALL, torch.stack([wb, wc], 2)), **kw)
        else:
            out = sb.sparse_bias_attention(q, k, v, None, **kw)
        out.backward(_strided(torch.randn_like(out)) if "strided" in variants else torch.randn_like(out))
    return rec.calls


def check_all(calls, expected_ops):
    names = sorted({str(op.name()) for op, _, _ in calls})
    assert set(expected_ops) <= set(names), names
    for op, args, kwargs in calls:
        result = torch.library.opcheck(op, args, kwargs, test_utils=TEST_UTILS)
        assert result == {name: "SUCCESS" for name in TEST_UTILS}, (op, result)


def _dtype_for(backend):
    """float64, or float32 for the Triton kernels (skipping a backend that cannot run here)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under the interpreter (test_ops_under_the_"
                    "interpreter)")
    dtype = torch.float32 if backend == "triton" else torch.float64
    skip_missing(backend, dtype)
    return dtype


OPS = {"sparse": ("sparse_bias::sparse_attention", "sparse_bias::sparse_attention_backward"),
       "plain": ("sparse_bias::sparse_attention", "sparse_bias::sparse_attention_backward"),
       "window": ("sparse_bias::window_attention", "sparse_bias::window_attention_backward"),
       "modality": ("sparse_bias::modality_attention", "sparse_bias::modality_attention_backward")}


def test_the_cases_reach_every_registered_op():
    registered = {name for name in custom_op_definitions() if name.startswith("sparse_bias::")}
    reached = set()
    for entry in OPS:
        reached |= {str(op.name()) for op, _, _ in recorded_calls(entry, "auto", ("shared",))}
    assert registered and reached == registered, (sorted(registered), sorted(reached))


@pytest.mark.parametrize("backend", CORRECTION_BACKENDS)
def test_sparse_attention_ops_on_every_backend(backend):
    dtype = _dtype_for(backend)
    check_all(recorded_calls("sparse", backend, ("per_head", "key_padding"), dtype), OPS["sparse"])


@pytest.mark.parametrize("backend", WINDOW_BACKENDS)
def test_window_attention_ops_on_every_backend(backend):
    dtype = _dtype_for(backend)
    check_all(recorded_calls("window", backend, ("per_head", "key_padding"), dtype), OPS["window"])


KINDS = [("shared",), ("per_head", "key_padding"), ("strided",), ("empty_windows",), ("dropout",)]


@pytest.mark.parametrize("entry", ["sparse", "window", "modality", "plain"])
@pytest.mark.parametrize("variants", KINDS, ids="-".join)
def test_ops_on_every_argument_kind(entry, variants):
    if entry in ("modality", "plain") and variants in (("per_head", "key_padding"), ("empty_windows",)):
        variants = ("key_padding",)                  # no window index in these calls
    check_all(recorded_calls(entry, "auto", variants), OPS[entry])


@pytest.mark.slow
@pytest.mark.parametrize("entry,backend", [("sparse", b) for b in CORRECTION_BACKENDS]
                         + [("window", b) for b in WINDOW_BACKENDS])
def test_ops_on_every_backend_and_argument_combination(entry, backend):
    dtype = _dtype_for(backend)
    for n in range(1, 4):
        for variants in itertools.combinations(VARIANTS[1:], n):
            check_all(recorded_calls(entry, backend, variants, dtype), OPS[entry])


@pytest.mark.slow
@pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed (extra: triton)")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="runs this file under the interpreter")
def test_ops_under_the_interpreter(monkeypatch):
    """The ``triton`` backend's cases (one argument set per op), on CPU tensors under ``TRITON_INTERPRET=1`` in a
    fresh process; its first-use self-checks (minutes under the interpreter) are tested in test_self_check.py."""
    monkeypatch.setenv("SPARSE_BIAS_SELF_CHECK", "off")
    pytest_under_the_interpreter(__file__, "-k", "triton and every_backend and not combination")
