"""Iteration over the window entries of a :class:`WindowIndex` in (batch element, head block) pieces."""
from __future__ import annotations

import torch

from .kernels import dropout_scale
from .windows import WindowIndex


def entry_blocks(win: WindowIndex, values: torch.Tensor, backend, heads: int, cdt: torch.dtype):
    """``(b, hs, e0, e1, local_q [n], bias values [h or 1, n] or None)`` per batch element and block of heads.

    ``values`` is ``[nnz]`` (shared by heads), ``[nnz, H]`` or None; ``backend.head_block`` heads per block.
    """
    step = backend.head_block or heads
    for b in range(win.batch_size):
        e0, e1 = win.batch_range(b)
        local_q = win.row[e0:e1] - b * win.num_queries
        vals = None if values is None else values[e0:e1].to(cdt)
        for h0 in range(0, heads, step):
            hs = slice(h0, min(h0 + step, heads))
            if vals is None:
                yield b, hs, e0, e1, local_q, None
            else:
                yield b, hs, e0, e1, local_q, (vals.unsqueeze(0) if vals.dim() == 1 else vals[:, hs].t())


def entry_keep(win: WindowIndex, b: int, hs: slice, heads: int, nk: int, dropout_p: float, seed: int,
               cdt: torch.dtype, e0: int, e1: int, local_q: torch.Tensor):
    """``[h, n]`` dropout multipliers ``keep / (1 - p)`` of batch element ``b``'s entries ``e0:e1``, or None."""
    if dropout_p <= 0:
        return None
    h = torch.arange(hs.start, hs.stop, device=win.device).unsqueeze(1)
    return dropout_scale(seed, dropout_p, b, h, local_q, win.key[e0:e1], heads, win.num_queries, nk, cdt)


