"""The fused Triton kernels against the dense reference, forward and backward.

Without a GPU they run under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors): the interpreter
must be switched on before triton is imported, so ``test_kernels_under_the_interpreter`` runs this file
again in a subprocess with the variable set. With CUDA the kernels run on the GPU directly.
"""
import os
import subprocess
import sys

import pytest
import torch

import sparse_bias as sb
from sparse_bias.backends.triton_backend import TRITON_AVAILABLE

pytestmark = pytest.mark.skipif(not TRITON_AVAILABLE, reason="triton is not installed (extra: triton)")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ACTIVE = INTERPRETED or torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED else "cuda"


@pytest.mark.skipif(INTERPRETED or torch.cuda.is_available(), reason="runs the interpreted checks in a subprocess")
def test_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


def case(per_head, masks, seed=0, dim=16):
    from test_attention import make_case
    layout = sb.KeyLayout(bev_shape=(6, 7), cam_shape=(2, 4, 5))
    win, q, k, v, wb, wc = make_case(layout, batch=2, heads=2, queries=5, dim=dim, per_head=per_head, seed=seed,
                                     bev_window=3, cam_window=3, dtype=torch.float32, device=DEVICE)
    kwargs = {}
    if masks:
        kpm = torch.zeros(2, layout.num_keys, dtype=torch.bool, device=DEVICE)
        kpm[0, 3:9] = True
        kwargs["key_padding_mask"] = kpm
    return win, q, k, v, wb.float(), wc.float(), kwargs


@pytest.mark.skipif(not ACTIVE, reason="runs in the interpreter subprocess of test_kernels_under_the_interpreter (or on CUDA)")
@pytest.mark.parametrize("dim", [16, 12])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_triton_matches_dense_reference(per_head, masks, dim):
    win, q, k, v, wb, wc, kwargs = case(per_head, masks, dim=dim)
    grad = torch.randn_like(q)
    results = []
    for backend in ("triton", "dense"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, wb, wc)]
        out = sb.sparse_bias_attention(*leaves[:3], sb.window_bias(win, leaves[3], leaves[4]), backend=backend,
                                       **kwargs)
        results.append([out.detach()] + list(torch.autograd.grad(out, leaves, grad)))
    for a, b in zip(*results):                    # fp32 against the fp32 dense reference
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(not ACTIVE, reason="runs in the interpreter subprocess of test_kernels_under_the_interpreter (or on CUDA)")
def test_triton_dropout_matches_reference():
    win, q, k, v, wb, wc, _ = case(True, False, seed=3)
    bias = sb.window_bias(win, wb, wc)
    kw = dict(dropout_p=0.25, dropout_seed=11)
    torch.testing.assert_close(sb.sparse_bias_attention(q, k, v, bias, backend="triton", **kw),
                               sb.dense_bias_attention(q, k, v, bias.to_dense(), **kw), rtol=2e-5, atol=2e-6)


def test_triton_backend_reports_why_it_cannot_run():
    ok, why = sb.backends.BACKENDS["triton"].can_run(torch.device("cpu"), torch.float64)
    assert not ok and ("float32" in why or "TRITON_INTERPRET" in why)
