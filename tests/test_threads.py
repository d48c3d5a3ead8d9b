"""Small calls and threads: a call below the work threshold runs on the calling thread (its fused kernels and the
torch operators inside it), a large one keeps torch's thread count, results do not depend on the thread count, and
the calling thread gets its thread count back (after an error too; other threads never lose theirs)."""
import threading

import pytest
import torch

import sparse_bias as sb
from sparse_bias._core import threads as _threads
from sparse_bias._core.extension import extension
from sparse_bias.backends.fused import FusedCPUBackend

OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()
pytestmark = [pytest.mark.skipif(not sb.extension_available(), reason="the compiled extension is not built"),
              pytest.mark.skipif(not OPENMP, reason="torch's intra-op pool is not OpenMP here")]


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _kernels():
    return extension()[0]


def decoder_case():
    """The cross-attention of examples/cmt_decoder_training.py: B=8, 4 heads of 8, Q=24, 352 keys, one-cell
    windows."""
    gen = torch.Generator().manual_seed(0)
    layout = sb.KeyLayout(bev_shape=(16, 16), cam_shape=(2, 6, 8))
    bev = torch.stack([torch.randint(0, 16, (8, 24), generator=gen) for _ in range(2)], -1)
    cam = torch.stack([torch.randint(0, n, (8, 24), generator=gen) for n in (2, 6, 8)], -1)
    win = sb.local_windows(layout, bev, cam, 1, 1)
    q = torch.randn(8, 4, 24, 8, generator=gen)
    k, v = (torch.randn(8, 4, layout.num_keys, 8, generator=gen) for _ in range(2))
    return q, k, v, win, torch.rand(2, 8, 24, generator=gen)


def large_case():
    """Window attention above the threshold: 1024 queries with 9 x 9 windows on a 64 x 64 grid, 4 heads of 32."""
    gen = torch.Generator().manual_seed(1)
    layout = sb.KeyLayout(bev_shape=(64, 64))
    bev = torch.stack([torch.randint(0, 64, (1, 1024), generator=gen) for _ in range(2)], -1)
    win = sb.local_windows(layout, bev, None, 9, 0)
    q = torch.randn(1, 4, 1024, 32, generator=gen)
    k, v = (torch.randn(1, 4, layout.num_keys, 32, generator=gen) for _ in range(2))
    return q, k, v, win


def sparse_step(q, k, v, win, weights):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, weights)]
    out = sb.sparse_bias_attention(*leaves[:3], sb.window_bias(win, leaves[3][0], leaves[3][1], scale=8.0),
                                   backend="fused")
    return [out.detach()] + list(torch.autograd.grad(out.square().sum(), leaves))


def window_step(q, k, v, win):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sb.window_attention(*leaves, win, backend="fused")
    return [out.detach()] + list(torch.autograd.grad(out.square().sum(), leaves))


def record_threads(monkeypatch, method):
    """Record torch.get_num_threads() inside the fused backend's ``method`` (a block of the call)."""
    seen = []
    original = getattr(FusedCPUBackend, method)

    def wrapped(self, *args):
        seen.append(torch.get_num_threads())
        return original(self, *args)
    monkeypatch.setattr(FusedCPUBackend, method, wrapped)
    return seen


def test_the_threshold_follows_the_shapes():
    q, k, _, win, _ = decoder_case()
    nnz = win.nnz
    assert _threads.call_work(q, k, nnz) == 2 * 4 * nnz * 8 + 2 * 8 * 4 * 24 * 352 * 8
    assert _threads.runs_serially(q, k, nnz)
    big_q, big_k = torch.empty(2, 8, 900, 32), torch.empty(2, 8, 56400, 32)        # the CMT fusion shape
    assert not _threads.runs_serially(big_q, big_k, 800_000)
    assert not _threads.runs_serially(big_q.to("meta"), big_k.to("meta"), 0)         # CPU calls only
    lq, lk, _, lwin = large_case()
    assert _threads.call_work(lq, lk, lwin.nnz, dense=False) >= _threads.SERIAL_WORK


def test_kernel_grain_runs_small_work_on_the_calling_thread():
    ext = _kernels()
    unit = ext.MIN_WORK_PER_THREAD
    assert ext.work_grain(48, 768) == 48                     # the decoder example's block: one chunk
    assert ext.work_grain(100, unit) == 100                  # at the threshold: one chunk
    assert ext.work_grain(100, 4 * unit) == 25               # four times the threshold: chunks of 25 items
    assert ext.work_grain(1, 100 * unit) == 1
    assert ext.work_grain(10, 0) == 10                       # no entries: nothing to split


def test_small_sparse_call_runs_on_the_calling_thread(two_threads, monkeypatch):
    seen_fwd = record_threads(monkeypatch, "forward_block")
    seen_bwd = record_threads(monkeypatch, "backward_block")
    before = _kernels().parallel_calls()
    sparse_step(*decoder_case())
    assert _kernels().parallel_calls() == before             # no kernel call split over threads
    assert seen_fwd and set(seen_fwd) == {1} and seen_bwd and set(seen_bwd) == {1}
    assert torch.get_num_threads() == 2                      # given back


def test_small_window_call_runs_on_the_calling_thread(two_threads, monkeypatch):
    seen = record_threads(monkeypatch, "window_forward_block")
    q, k, v, win, _ = decoder_case()
    before = _kernels().parallel_calls()
    window_step(q, k, v, win)
    assert _kernels().parallel_calls() == before
    assert set(seen) == {1} and torch.get_num_threads() == 2


def test_large_call_keeps_the_threads_and_the_same_results(two_threads, monkeypatch):
    seen = record_threads(monkeypatch, "window_forward_block")
    case = large_case()
    before = _kernels().parallel_calls()
    two = window_step(*case)
    assert _kernels().parallel_calls() > before              # the kernels split this one
    assert set(seen) == {2}
    torch.set_num_threads(1)
    one = window_step(*case)
    for a, b in zip(two, one):                               # each output element has one owner: same bits
        assert torch.equal(a, b)


def test_small_call_results_do_not_depend_on_the_threads(two_threads):
    case = decoder_case()
    two = sparse_step(*case)
    torch.set_num_threads(1)
    for a, b in zip(two, sparse_step(*case)):
        assert torch.equal(a, b)


def test_thread_count_given_back_after_an_error(two_threads, monkeypatch):
    def fail(self, *args):
        assert torch.get_num_threads() == 1
        raise RuntimeError("inside the call")
    monkeypatch.setattr(FusedCPUBackend, "forward_block", fail)
    q, k, v, win, weights = decoder_case()
    with pytest.raises(RuntimeError, match="inside the call"):
        sb.sparse_bias_attention(q, k, v, sb.window_bias(win, weights[0], weights[1]), backend="fused")
    assert torch.get_num_threads() == 2


def test_other_threads_keep_their_count(two_threads):
    q, k, _, win, _ = decoder_case()
    other = []
    with _threads.calling_thread_if_small(q, k, win.entries().key):
        assert torch.get_num_threads() == 1
        worker = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
        worker.start()
        worker.join()
    assert other == [2] and torch.get_num_threads() == 2
