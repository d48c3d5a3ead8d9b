"""Several Python threads calling the library at once give what the same calls give one after another.

The very first calls are the concurrent ones: a fresh window index (its cached structures derived on first use), the
first-use self-checks (under the ``always`` policy, so that CPU backends take them too) and the dispatch's caches.
"""
import threading

import pytest
import torch

import sparse_bias as sb
from sparse_bias._core.selfcheck import reset_self_checks
from sparse_bias.nn import SparseBiasMultiheadAttention
from helpers import SMALL, random_positions

THREADS = 4
B, Q, C, H = 2, 9, 16, 4


def _index():
    bev_pos, cam_pos = random_positions(SMALL, B, Q, 2, torch.Generator().manual_seed(0))
    return sb.local_windows(SMALL, bev_pos, cam_pos, 5, 3)


def _inputs(i):
    g = torch.Generator().manual_seed(100 + i)
    query = torch.randn(Q, B, C, generator=g, dtype=torch.float64)
    memory = torch.randn(SMALL.num_keys, B, C, generator=g, dtype=torch.float64)
    weights = torch.randn(B, Q, H, generator=g, dtype=torch.float64), torch.randn(B, Q, H, generator=g,
                                                                                  dtype=torch.float64)
    kpm = torch.zeros(B, SMALL.num_keys, dtype=torch.bool)
    kpm[i % B, -(i + 1):] = True
    return query, memory, weights, kpm


def _call(module, win, i, local):
    """Output and the gradients of the call's own inputs (never a shared ``.grad``)."""
    query, memory, (wb, wc), kpm = _inputs(i)
    leaves = [t.requires_grad_() for t in (query, memory, wb, wc)]
    extra = dict(local_window=win) if local else {}
    out = module(query, memory, memory, key_padding_mask=kpm, attention_bias=sb.window_bias(win, wb, wc), **extra)
    return [out.detach()] + list(torch.autograd.grad(out.square().sum(), leaves))


def _concurrently(fn, n):
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def work(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    assert not errors, errors
    return results


@pytest.mark.parametrize("backend", ["auto", "sparse", "torch"])
@pytest.mark.parametrize("local", [False, True])
def test_one_module_from_four_threads_equals_the_calls_in_turn(monkeypatch, backend, local):
    torch.manual_seed(0)
    module = SparseBiasMultiheadAttention(C, H, backend=backend).double().eval()
    monkeypatch.setenv("SPARSE_BIAS_SELF_CHECK", "always")
    reset_self_checks()
    win = _index()                                    # fresh: nothing derived or cached yet
    together = _concurrently(lambda i: _call(module, win, i, local), THREADS)
    reset_self_checks()
    win = _index()
    in_turn = [_call(module, win, i, local) for i in range(THREADS)]
    assert all(passed for passed, _ in sb.self_check_results().values())
    for got, want in zip(together, in_turn):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_first_use_check_runs_once_when_threads_race():
    """Threads reaching an unchecked kernel at once: the check runs once, every thread gets its result, one
    warning for a failure."""
    import threading
    import time
    import warnings

    from sparse_bias._core import verify

    calls = []

    def check():
        calls.append(1)
        time.sleep(0.05)                              # long enough for the other threads to arrive
        return False, "wrong"

    key = ("test", "race", object())
    results = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=lambda: results.append(verify.verified(key, check, lambda d: d)))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert calls == [1] and results == [(False, "wrong")] * 4
    assert sum(str(w.message) == "wrong" for w in caught) == 1
