"""Iteration over the window entries of a `WindowIndex` in (batch element, head block) pieces."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ._call import Call
from .backends.base import WindowBlock
from .windows import WindowIndex


def window_blocks(win: WindowIndex, values: Optional[torch.Tensor], backend, shape: Tuple[int, int, int, int],
                  call: Call) -> Iterator[WindowBlock]:
    """One `WindowBlock` per batch element and block of ``backend.head_block`` heads (all when None).

    ``values`` are the bias values ``[nnz]`` (shared by heads), ``[nnz, H]`` or None; ``shape`` is ``(B, H, Q, K)``
    of the scores.
    """
    heads = shape[1]
    step = backend.head_block or heads
    for b in range(win.batch_size):
        e0, e1 = win.batch_range(b)
        row = win.row[e0:e1]
        vals = None if values is None else values[e0:e1].to(call.cdt)
        for h0 in range(0, heads, step):
            hs = slice(h0, min(h0 + step, heads))
            bvals = None if vals is None else (vals.unsqueeze(0) if vals.dim() == 1 else vals[:, hs].t())
            yield WindowBlock(b, hs, e0, e1, row, win.key[e0:e1], bvals, call, shape)
