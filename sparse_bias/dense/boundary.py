"""What the attention kernels assume at their boundary, in one place: a unit last stride, and how a fully masked
row (every key ``-inf``) is represented (docs/conventions.md, "Fully masked rows" and "Memory layouts")."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["unit_stride", "fully_masked_rows", "kernel_lse"]


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1, else a contiguous copy: the layout the private attention ops
    and the compiled kernels assume (``.contiguous()`` alone does not copy a size-1 last dim of stride 2)."""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


def fully_masked_rows(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Bool ``[B, H|1, Q|1]``: the rows of an additive mask whose every key is ``-inf`` (or None without a mask)."""
    return None if mask is None else torch.isneginf(mask).all(-1)


def kernel_lse(lse: torch.Tensor) -> torch.Tensor:
    """The log-sum-exp as the probability kernels take it: ``+inf`` for a fully masked row (``-inf``), so that
    ``exp(s_j - L)`` is 0 at every key of that row instead of ``exp(-inf + inf) = NaN``."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))
