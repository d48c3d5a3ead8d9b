"""First-use self-checks of the GPU paths (sparse_bias._core.selfcheck), exercised on CPU by injecting faults."""
import warnings

import pytest
import torch

import sparse_bias as sb
from sparse_bias._core import selfcheck, verify
from sparse_bias._core.concentrated import window_share
from sparse_bias.backends import BACKENDS

from helpers import SMALL, make_case, skip_missing


@pytest.fixture
def always(monkeypatch):
    """Check CPU backends too, from a clean slate."""
    monkeypatch.setenv(verify.SELF_CHECK_ENV, "always")
    selfcheck.reset_self_checks()
    yield
    selfcheck.reset_self_checks()


def corrupt(monkeypatch, name, method="forward_block"):
    backend = BACKENDS[name]
    original = getattr(backend, method)

    def faulty(*args):
        res = original(*args)
        out = args[-1][-1] if method == "forward_block" else args[-1]     # totals = (den, removed, out) / out
        out.add_(0.5)
        return res
    monkeypatch.setattr(backend, method, faulty)


def case():
    win, q, k, v, wb, wc = make_case(SMALL, per_head=True, seed=2, dtype=torch.float32)
    return win, q, k, v, sb.window_bias(win, wb.float(), wc.float())


def test_healthy_backends_pass_and_are_checked_once(always):
    skip_missing("fused")
    win, q, k, v, bias = case()
    assert sb.select_backend(q, bias)[0] == "fused"
    assert sb.select_window_backend(q)[0] == "fused"
    results = selfcheck.self_check_results()
    assert results[("correction", "fused", "cpu", torch.float32, 8)] == (True, "matches the dense reference")
    assert results[("window", "fused", "cpu", torch.float32, 8)][0]
    sb.sparse_bias_attention(q, k, v, bias)
    assert len(selfcheck.self_check_results()) == 2


def test_faulty_kernel_warns_and_falls_back(always, monkeypatch):
    skip_missing("fused")
    corrupt(monkeypatch, "fused")
    win, q, k, v, bias = case()
    with pytest.warns(RuntimeWarning, match=r"backend 'fused' disagrees with the dense reference.*correction"):
        name, why = sb.select_backend(q, bias)
    assert name == "sparse" and "requested" not in why
    with warnings.catch_warnings():
        warnings.simplefilter("error")            # remembered: no second warning
        out = sb.sparse_bias_attention(q, k, v, bias, backend="fused")     # requested, but it failed: falls back
    torch.testing.assert_close(out, sb.dense_bias_attention(q, k, v, bias.to_dense()), rtol=1e-5, atol=1e-6)
    assert "failed its self-check" in sb.select_backend(q, bias, backend="fused")[1]


def test_faulty_window_kernel_warns_and_falls_back(always, monkeypatch):
    skip_missing("fused")
    corrupt(monkeypatch, "fused", "window_forward_block")
    win, q, k, v, _ = case()
    with pytest.warns(RuntimeWarning, match="backend 'fused' disagrees.*window"):
        out = sb.window_attention(q, k, v, win)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=win.to_dense_mask().unsqueeze(1))
    rows = win.counts() > 0
    torch.testing.assert_close(out[rows.unsqueeze(1).expand(-1, q.shape[1], -1)],
                               ref[rows.unsqueeze(1).expand(-1, q.shape[1], -1)], rtol=1e-5, atol=1e-6)


def test_a_kernel_that_raises_fails_its_check(always, monkeypatch):
    def broken(*args):
        raise RuntimeError("illegal memory access")
    monkeypatch.setattr(BACKENDS["sparse"], "forward_block", broken)
    with pytest.warns(RuntimeWarning, match="illegal memory access"):
        ok, detail = selfcheck.self_check("sparse", torch.device("cpu"), torch.float32, 8)
    assert not ok and "illegal memory access" in detail


def test_every_backend_failing_is_an_error(always, monkeypatch):
    for name in ("fused", "sparse", "scatter", "torch"):
        corrupt(monkeypatch, name)
    win, q, k, v, bias = case()
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="no correction backend can run"):
        sb.select_backend(q, bias)


def test_policy(monkeypatch):
    monkeypatch.setenv(verify.SELF_CHECK_ENV, "gpu")
    assert not verify.needs_self_check("fused", torch.device("cpu"))
    assert verify.needs_self_check("triton", torch.device("cpu"))            # Triton: wherever it runs
    assert verify.needs_self_check("scatter", torch.device("cuda"))
    monkeypatch.setenv(verify.SELF_CHECK_ENV, "off")
    assert not verify.needs_self_check("triton", torch.device("cuda"))
    monkeypatch.setenv(verify.SELF_CHECK_ENV, "sometimes")
    with pytest.raises(ValueError, match="SPARSE_BIAS_SELF_CHECK must be one of"):
        verify.needs_self_check("fused", torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_problem_covers_both_paths(always, monkeypatch, dtype):
    """The check's concentrated attention puts rows on the exact-row path and rows on the correction, in every
    dtype, with window shares around 0.9 and biases of both signs."""
    from sparse_bias._core import correction as _sparse_function
    flagged = []
    original = _sparse_function.flagged_rows
    monkeypatch.setattr(_sparse_function, "flagged_rows", lambda *a: flagged.append(original(*a)) or flagged[-1])
    assert selfcheck.self_check("sparse", torch.device("cpu"), dtype, 16)[0]
    assert flagged and 1 <= int(flagged[0].sum()) < flagged[0].numel()
    win, (q, k, _, values), _, _ = selfcheck._case(16, "correction")
    assert window_share(q, k, win).median() > 0.8
    assert float(values.min()) < -4 and float(values.max()) > 4
