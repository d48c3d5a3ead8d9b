"""The call record: what an attention call hands down to the dense pass, the autograd functions and the backends
besides the tensors -- one frozen value instead of the same five arguments threaded through every function."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch

__all__ = ["Call", "compute_dtype", "seed64"]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def seed64(seed: int) -> int:
    """The dropout seed as the compiled kernels take it: the signed int64 with the same low 64 bits (the kernels
    read them back as unsigned), so every seed -- negative or above 2^63 included -- gives the decisions of
    `sparse_bias.dense.dropout.dropout_keep`."""
    bits = int(seed) & 0xFFFFFFFFFFFFFFFF
    return bits - (1 << 64) if bits >= (1 << 63) else bits


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

    def as_args(self) -> tuple:
        """``(mask, scale, dropout_p, seed)`` as the registered ops take them: the seed a CPU int64 scalar tensor (the
        int64 with the same low 64 bits; a tensor -- drawn inside a compiled graph -- passes as is)."""
        seed = self.seed if isinstance(self.seed, torch.Tensor) else torch.tensor(seed64(self.seed), dtype=torch.int64)
        return self.mask, self.scale, self.dropout_p, seed

    @classmethod
    def from_args(cls, q: torch.Tensor, mask: Optional[torch.Tensor], scale: float, dropout_p: float,
                  seed: torch.Tensor) -> "Call":
        """The record inside an op, from `as_args`'s values (the seed read on the host: a CPU tensor, never a device
        synchronisation)."""
        return cls(scale, mask, dropout_p, int(seed.tolist()) if dropout_p > 0 else 0, compute_dtype(q.dtype))

    def keys(self, start: int, end: int, total: int) -> "Call":
        """The record for keys ``start:end`` of ``total``: the mask sliced along keys, the key range set."""
        mask = None if self.mask is None else (self.mask[..., start:end] if self.mask.shape[-1] > 1 else self.mask)
        return replace(self, mask=mask, key_range=(start, total))
