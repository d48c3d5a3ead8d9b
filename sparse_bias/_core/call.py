"""The call record: what an attention call hands down to the dense pass, the autograd functions and the backends
besides the tensors -- one frozen value instead of the same five arguments threaded through every function."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

__all__ = ["Call", "compute_dtype"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True, eq=False)
class Call:
    """One attention call's settings.

    Attributes:
        scale: the softmax scale.
        mask: the additive float mask, 4-D and broadcastable to ``[B, H, Q, K]`` (``-inf`` = masked), or None.
        dropout_p: attention dropout probability (the counter-hash decisions of `sparse_bias.dense.dropout`).
        seed: the dropout seed (any 64-bit integer; 0 without dropout).
        cdt: the compute (accumulation) dtype: float32, or float64 for float64 inputs.
        key_range: ``(offset, total)`` when the keys are ``offset : offset + K`` of a memory of ``total`` keys (a
            modality of `sparse_bias.ModalityBias`): dropout decisions are then those of the whole memory.
    """

    scale: float
    mask: Optional[torch.Tensor] = None
    dropout_p: float = 0.0
    seed: int = 0
    cdt: torch.dtype = torch.float32
    key_range: Optional[Tuple[int, int]] = None

    @classmethod
    def of(cls, q: torch.Tensor, scale: float, mask=None, dropout_p: float = 0.0, seed: int = 0) -> "Call":
        """The record of a call on ``q`` (the compute dtype follows q's dtype)."""
        return cls(scale, mask, dropout_p, seed, compute_dtype(q.dtype))

    def keys(self, start: int, end: int, total: int) -> "Call":
        """The record for keys ``start:end`` of ``total``: the mask sliced along keys, the key range set."""
        mask = None if self.mask is None else (self.mask[..., start:end] if self.mask.shape[-1] > 1 else self.mask)
        return replace(self, mask=mask, key_range=(start, total))
