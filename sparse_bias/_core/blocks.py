"""Iteration over the window entries of an index in blocks of heads (every batch element at once)."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from .call import Call
from .entries import Entries
from ..backends.base import WindowBlock


def window_blocks(ent: Entries, values: Optional[torch.Tensor], backend, shape: Tuple[int, int, int, int],
                  call: Call) -> Iterator[WindowBlock]:
    """One `WindowBlock` per block of ``backend.head_block`` heads (all when None), over all ``nnz`` entries.

    ``values`` are the bias values ``[nnz]`` (shared by heads), ``[nnz, H]`` or None; ``shape`` is ``(B, H, Q, K)``
    of the scores.
    """
    heads = shape[1]
    step = backend.head_block or heads
    vals = None if values is None else values.to(call.cdt)
    for h0 in range(0, heads, step):
        hs = slice(h0, min(h0 + step, heads))
        bvals = None if vals is None else (vals.unsqueeze(0) if vals.dim() == 1 else vals[:, hs].t())
        yield WindowBlock(hs, ent, bvals, call, shape)


def head_major(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, Q(, D)]`` -> a contiguous ``[H, B * Q(, D)]`` copy (the layout of the per-row totals)."""
    x = x.transpose(0, 1)
    return x.reshape((x.shape[0], x.shape[1] * x.shape[2]) + tuple(x.shape[3:])).contiguous()


def batch_major(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``[H, B * Q(, D)]`` -> ``[B, H, Q(, D)]`` (contiguous)."""
    heads, rows = x.shape[:2]
    return x.view((heads, batch, rows // max(batch, 1)) + tuple(x.shape[2:])).transpose(0, 1).contiguous()
