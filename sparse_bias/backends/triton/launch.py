"""Host-side helpers of the Triton launchers: sizes, per-entry operands, the float32 ``dk`` / ``dv`` accumulators.

Nothing here imports triton or reads a device value on the host: only sizes and strides are inspected.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["next_power_of_2", "cdiv", "entry_rows", "unit_last", "KVAccumulator"]


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``): the padded head dim ``DP`` of the kernels."""
    return 1 << max(int(n) - 1, 0).bit_length()


def cdiv(n: int, block: int) -> int:
    """The number of blocks of ``block`` that cover ``n``."""
    return -(-int(n) // block)


def entry_rows(t: Optional[torch.Tensor], name: str, h: int, nnz: int) -> Tuple[Optional[torch.Tensor], int]:
    """A per-entry operand ``[h or 1, nnz]`` as the kernels read it: ``(tensor with a unit last stride, head stride)``
    -- the head stride 0 when the operand is shared by all heads; ``(None, 0)`` when absent."""
    if t is None:
        return None, 0
    if t.dim() != 2 or t.shape[0] not in (1, h) or t.shape[1] != nnz:
        raise ValueError(f"{name} must be [h or 1, nnz] = [{h} or 1, {nnz}], got shape {tuple(t.shape)}")
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def unit_last(t: torch.Tensor, name: str) -> None:
    """Refuse an output written in place whose last dim is not contiguous."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit last stride (it is written in place)")


class KVAccumulator(NamedTuple):
    """Where a backward kernel adds its ``dk`` / ``dv`` terms for the heads ``h0 .. h0 + h - 1`` of the gradients
    ``dk``, ``dv`` ``[B, H, K, D]``. Atomic adds need float32: float32 contiguous gradients take them directly
    (``gk``, ``gv`` are ``dk``, ``dv``; the kernels address head ``first + i`` of ``heads``); other gradients get a
    float32 scratch ``[B, h, K, D]`` (``heads = h``, ``first = 0``), cast and added once by `flush`.

    Attributes:
        dk, dv: the gradients ``[B, H, K, D]``.
        gk, gv: the float32 buffers the kernel adds into.
        heads: the head count of ``gk`` / ``gv``.
        first: the head of ``gk`` / ``gv`` that the block's head 0 adds into.
        hs: the block's heads in ``dk`` / ``dv``.
    """

    dk: torch.Tensor
    dv: torch.Tensor
    gk: torch.Tensor
    gv: torch.Tensor
    heads: int
    first: int
    hs: slice

    @classmethod
    def of(cls, dk: torch.Tensor, dv: torch.Tensor, h0: int, h: int) -> "KVAccumulator":
        hs = slice(h0, h0 + h)
        if all(t.dtype == torch.float32 and t.is_contiguous() for t in (dk, dv)):
            return cls(dk, dv, dk, dv, dk.shape[1], h0, hs)
        shape = (dk.shape[0], h) + tuple(dk.shape[2:])
        gk, gv = (torch.zeros(shape, dtype=torch.float32, device=dk.device) for _ in range(2))
        return cls(dk, dv, gk, gv, h, 0, hs)

    def flush(self) -> None:
        """Add the float32 scratch (if any) into ``dk`` / ``dv`` in their dtype."""
        if self.gk is not self.dk:
            self.dk[:, self.hs] += self.gk.to(self.dk.dtype)
            self.dv[:, self.hs] += self.gv.to(self.dv.dtype)
