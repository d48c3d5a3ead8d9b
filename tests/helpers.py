"""Shared test cases and harness: random window positions and layouts, attention cases, and the
forward-plus-gradients comparison every attention test uses (as torch-scatter's ``testing.py``)."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import strategies as st

import sparse_bias as sb
from sparse_bias._core.compat import CUSTOM_OPS
from sparse_bias.backends import BACKENDS as REGISTRY, backend_names
from sparse_bias.dense import lse as _dense_lse
from sparse_bias.profiles import PROFILES

#: Features of the installed torch, probed (docs/install.md, "Support matrix"): tests of a feature skip without it.
needs_custom_ops = pytest.mark.skipif(not CUSTOM_OPS, reason="this torch has no torch.library.custom_op (2.4+): "
                                      "the ops run as eager autograd Functions, nothing is registered")
needs_cpu_flash = pytest.mark.skipif(not _dense_lse._has_op("_scaled_dot_product_flash_attention_for_cpu"),
                                     reason="this torch has no CPU flash attention op with log-sum-exp (2.2+)")


def skip_without_matmul(dtype, device="cpu"):
    """Skip where torch has no matmul in ``dtype`` on ``device`` (torch 2.0's CPU matmul has no float16): the naive
    same-precision reference cannot run there."""
    try:
        torch.ones(1, 1, dtype=dtype, device=device) @ torch.ones(1, 1, dtype=dtype, device=device)
    except RuntimeError as err:
        pytest.skip(f"this torch has no {dtype} matmul on {device}: {err}")


def skip_without_dynamo():
    """Skip where ``torch.compile`` cannot run at all (torch 2.0's dynamo refuses Python 3.11)."""
    from torch._dynamo import eval_frame
    check = getattr(eval_frame, "check_if_dynamo_supported", None)
    try:
        if check is not None:
            check()
    except RuntimeError as err:
        pytest.skip(f"torch.compile cannot run here: {err}")

SMALL = sb.KeyLayout(bev_shape=(9, 11), cam_shape=(3, 5, 7))


def random_positions(layout, batch, queries, slots, gen, p_missing=0.2):
    bev_pos = cam_pos = None
    if layout.bev_shape is not None:
        h, w = layout.bev_shape
        bev_pos = torch.stack([torch.randint(0, h, (batch, queries), generator=gen),
                               torch.randint(0, w, (batch, queries), generator=gen)], dim=-1)
        bev_pos[torch.rand(batch, queries, generator=gen) < p_missing] = -1
    if layout.cam_shape is not None:
        v, hc, wc = layout.cam_shape
        slots = min(slots, v)
        views = torch.rand(batch, queries, v, generator=gen).argsort(-1)[..., :slots]   # distinct views
        cam_pos = torch.stack([views, torch.randint(0, hc, (batch, queries, slots), generator=gen),
                               torch.randint(0, wc, (batch, queries, slots), generator=gen)], dim=-1)
        cam_pos[torch.rand(batch, queries, slots, generator=gen) < p_missing] = -1
    return bev_pos, cam_pos


odd_or_zero = st.sampled_from([0, 1, 3, 5, 7, 9])


@st.composite
def layouts(draw):
    bev = draw(st.one_of(st.none(), st.tuples(st.integers(1, 12), st.integers(1, 12))))
    cam = draw(st.one_of(st.none(), st.tuples(st.integers(1, 4), st.integers(1, 8), st.integers(1, 10))))
    if bev is None and cam is None:
        bev = (draw(st.integers(1, 12)), draw(st.integers(1, 12)))
    return sb.KeyLayout(bev_shape=bev, cam_shape=cam)


#: The registered backends of each operation (`sparse_bias.backends.BACKENDS`): tests parametrise over these, so a
#: new backend is tested by registering it; `skip_missing` skips those that cannot run here.
CORRECTION_BACKENDS = list(backend_names("correction"))
WINDOW_BACKENDS = list(backend_names("window"))


def profile_names():
    """The registered bias profiles (`sparse_bias.profiles.PROFILES`), read when called: the profile tests
    parametrise over these, so a new profile is tested by registering it."""
    return tuple(PROFILES)


def skip_missing(backend, dtype=torch.float64):
    if backend in REGISTRY:
        ok, why = REGISTRY[backend].can_run(torch.device("cpu"), dtype)
        if not ok:
            pytest.skip(f"backend {backend!r} cannot run here: {why}")


def make_case(layout, batch=2, heads=3, queries=7, dim=8, per_head=False, seed=0, bev_window=5, cam_window=3,
              dtype=torch.float64, device="cpu", scale_q=1.0, weight_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    bev_pos, cam_pos = random_positions(layout, batch, queries, 2, gen)
    win = sb.local_windows(layout, bev_pos, cam_pos, bev_window, cam_window).to(device)
    nk = layout.num_keys
    q = (torch.randn(batch, heads, queries, dim, generator=gen, dtype=torch.float64) * scale_q).to(device, dtype)
    k = torch.randn(batch, heads, nk, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    v = torch.randn(batch, heads, nk, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    tail = (heads,) if per_head else ()
    wb = (weight_scale * (2 * torch.rand((batch, queries) + tail, generator=gen, dtype=torch.float64) - 1)).to(device)
    wc = (weight_scale * (2 * torch.rand((batch, queries) + tail, generator=gen, dtype=torch.float64) - 1)).to(device)
    return win, q, k, v, wb, wc


def forward_and_grads(fn, q, k, v, wb, wc, grad, win, **kwargs):
    """Output and gradients (q, k, v, both weights) of fn(q, k, v, bias-from-weights)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, wb, wc)]
    bias = sb.window_bias(win, leaves[3], leaves[4].to(leaves[3].dtype))
    out = fn(*leaves[:3], bias, **kwargs)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, grad))


def sparse_fn(backend):
    def fn(q, k, v, bias, **kwargs):
        return sb.sparse_bias_attention(q, k, v, bias, backend=backend, **kwargs)
    return fn


def dense_path(q, k, v, bias, **kwargs):
    """The library's dense path (`sb.dense_bias_attention` on ``bias.to_dense()``) in the inputs' dtype: the naive
    same-precision version the precision tests measure drift against. The references are in tests/reference.py."""
    return sb.dense_bias_attention(q, k, v, bias.to_dense(), **kwargs)


#: `dense_path` under the name test_triton.py imports
reference = dense_path


def assert_all_close(got, want, rtol=1e-10, atol=1e-10):
    names = ["out", "dq", "dk", "dv", "d_bev_weight", "d_cam_weight"]
    for name, a, b in zip(names, got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def run_python(code: str, **env) -> str:
    """Run ``code`` in a fresh interpreter (extra environment variables as keywords); its stdout, or fail."""
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, **env))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def pytest_under_the_interpreter(test_file: str, *args: str) -> None:
    """Run ``test_file`` (its tests selected by ``args``, e.g. ``-k name``) with pytest in a fresh process under the
    Triton interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported); fail unless all pass."""
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, *args],
                         env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(test_file))
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and " failed" not in res.stdout
