"""Small attention calls run on the calling thread: the fused kernels and the torch operators inside the call.

A call's arithmetic is estimated from its shapes alone (nothing read from the data): ``2 B H Q K D`` multiply-adds
for the dense pass (scores, and probabilities times values) plus ``2 H nnz D`` for the window terms. Below
`SERIAL_WORK` the whole call -- forward or backward -- runs on the calling thread with one thread
(``sparse_bias._C.serial_begin``: the calling thread's OpenMP and MKL thread counts are 1 for the call and restored
after it; other threads keep theirs). Splitting such a call over threads saves at most a millisecond or two of
arithmetic, less than the call's fixed cost, while each torch operator inside it that opens a parallel region (the
CPU flash kernel, ``exp``, ``log`` ...) pays the region's start and end barrier: microseconds on an idle machine, up
to a scheduler time slice when the cores are shared with other processes. Larger calls keep torch's
thread count (`torch.set_num_threads`), and inside them the fused kernels split only work of at least
``sparse_bias._C.MIN_WORK_PER_THREAD`` multiply-adds per thread.

The scope needs the compiled kernels, already loaded (the ``auto`` and ``fused`` backends load them): without them
(``SPARSE_BIAS_NO_EXT=1``, no compiler) torch's operators run with torch's thread count. CPU calls only.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .extension import loaded_extension

__all__ = ["SERIAL_WORK", "call_work", "runs_serially", "calling_thread_if_small"]

#: multiply-adds below which a call runs on the calling thread (about 1-3 ms of arithmetic on one core)
SERIAL_WORK = 1 << 24


def call_work(q: torch.Tensor, k: torch.Tensor, nnz: int, dense: bool = True) -> int:
    """The multiply-adds of a call's forward: the dense pass over ``q [B, H, Q, D]`` and ``k [B, H, K, D]`` (when
    ``dense``) and the window terms of ``nnz`` entries."""
    batch, heads, queries, dim = q.shape
    work = 2 * heads * nnz * dim
    if dense:
        work += 2 * batch * heads * queries * k.shape[2] * dim
    return work


def runs_serially(q: torch.Tensor, k: torch.Tensor, nnz: int, dense: bool = True) -> bool:
    """Whether a call on these shapes runs on the calling thread alone (a CPU call below `SERIAL_WORK`)."""
    return q.device.type == "cpu" and call_work(q, k, nnz, dense) < SERIAL_WORK


@contextlib.contextmanager
def calling_thread_if_small(q: torch.Tensor, k: torch.Tensor, key, dense: bool = True) -> Iterator[None]:
    """Run the body on the calling thread alone when the call is small (`runs_serially`; ``key`` is the index's
    ``[nnz]`` key tensor, or None for no window entries); otherwise with torch's thread count."""
    ext = loaded_extension()
    if ext is None or not runs_serially(q, k, 0 if key is None else key.shape[0], dense):
        yield
        return
    state = ext.serial_begin()
    try:
        yield
    finally:
        ext.serial_end(state)
