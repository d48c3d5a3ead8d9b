"""The attention-dropout decision: one counter-based hash for Python, the compiled CPU kernels and Triton.

Each score ``(b, h, q, key)`` of the ``[B, H, Q, K]`` score tensor is kept or dropped by a pure function of the seed
and its flat index, so the dense pass, the window correction and every backward see one consistent mask without
storing it. ``csrc/dropout_hash.h`` and `sparse_bias.backends.triton.dense` compute the same bits.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .._core.call import seed64

__all__ = ["dropout_keep", "dropout_scale", "dropout_mask", "seed_keys", "seed64"]

_M32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer on int64 tensors (or Python ints) holding values < 2^32 (products stay below 2^63)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _M32
    return (x >> 16) ^ x


def seed_keys(seed: int) -> Tuple[int, int]:
    """The two 32-bit keys of a dropout seed: its low and high halves, each mixed by `_hash32`, so that
    seeds differing in a few bits give unrelated masks (raw seeds XORed into the index would give masks that
    are permutations of each other)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return int(_hash32((seed & _M32) ^ 0x9E3779B9)), int(_hash32((seed >> 32) ^ 0x7F4A7C15))


def dropout_keep(seed: int, flat_index: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of attention dropout as a pure function of ``(seed, flat_index)``.

    ``flat_index`` is the position of a score in the ``[B, H, Q, K]`` score tensor (row-major). The
    same entry always gets the same decision, so the dense pass, the window correction and the
    backward all see one consistent mask without storing it. Keep probability ``1 - p``:
    ``hash(hash(lo ^ k_lo) ^ hi ^ k_hi)``, with ``lo`` / ``hi`` the halves of the index and ``k_lo`` / ``k_hi``
    the keys of `seed_keys`; kept when its low 24 bits, as a uniform in [0, 1), are ``>= p``.
    """
    k_lo, k_hi = seed_keys(seed)
    x = flat_index.long()
    h = _hash32((x & _M32) ^ k_lo)
    h = _hash32(h ^ (x >> 32) ^ k_hi)
    uniform = (h & 0xFFFFFF).to(torch.float32) * (1.0 / (1 << 24))
    return uniform >= p


def dropout_scale(seed: int, p: float, index, shape, dtype: torch.dtype) -> torch.Tensor:
    """Dropout multipliers ``keep / (1 - p)`` of the scores ``index = (b, h, q, key)`` of a score tensor of
    ``shape = (B, H, Q, K)`` (``B`` unused: the batch index leads).

    ``b``, ``h``, ``q``, ``key`` are ints or broadcastable LongTensors; the result has their broadcast shape.
    The one place that maps a score to its flat index for `dropout_keep`.
    """
    b, h, q, key = index
    _, heads, num_queries, num_keys = shape
    flat = ((b * heads + h) * num_queries + q) * num_keys + key
    return dropout_keep(seed, flat, p).to(dtype) / (1 - p)


def dropout_mask(seed: int, shape, p: float, device=None) -> torch.Tensor:
    """The full keep-mask ``[B, H, Q, K]`` of `dropout_keep` (for references and tests)."""
    numel = math.prod(shape)
    return dropout_keep(seed, torch.arange(numel, device=device), p).view(*shape)
