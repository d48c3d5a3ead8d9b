"""Iteration over the window entries of a `WindowIndex` in (batch element, head block) pieces."""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .backends.base import WindowBlock
from .windows import WindowIndex


def window_blocks(win: WindowIndex, values: Optional[torch.Tensor], backend, heads: int, num_keys: int,
                  mask: Optional[torch.Tensor], dropout_p: float, seed: int, cdt: torch.dtype) -> Iterator[WindowBlock]:
    """One `WindowBlock` per batch element and block of ``backend.head_block`` heads (all when None).

    ``values`` are the bias values ``[nnz]`` (shared by heads), ``[nnz, H]`` or None; ``mask`` the additive mask
    (4-D, broadcastable to ``[B, H, Q, K]``) or None.
    """
    step = backend.head_block or heads
    for b in range(win.batch_size):
        e0, e1 = win.batch_range(b)
        row = win.row[e0:e1]
        vals = None if values is None else values[e0:e1].to(cdt)
        for h0 in range(0, heads, step):
            hs = slice(h0, min(h0 + step, heads))
            bvals = None if vals is None else (vals.unsqueeze(0) if vals.dim() == 1 else vals[:, hs].t())
            yield WindowBlock(b, hs, e0, e1, row, bvals, mask, dropout_p, seed, heads, win.num_queries, num_keys,
                              win.key[e0:e1], cdt)
