"""Bias profiles: one small pure function per profile, and the registry `PROFILES` that names them.

A profile maps a window entry's offset from its window centre to the multiplicative falloff of the bias:
``bias = weight * scale * f(dy, dx, sigma)``. The functions use element-wise tensor operations only, so the same
function serves `sparse_bias.window_bias` (tensors ``[nnz]`` over all entries) and
`sparse_bias.flex.flex_score_mod` (one score at a time inside FlexAttention's ``score_mod``).

Adding a profile is one function here and one entry in `PROFILES`; both users pick it up by name.

Example:

    >>> import torch
    >>> from sparse_bias.profiles import PROFILES, get_profile
    >>> sorted(PROFILES)
    ['flat', 'gaussian']
    >>> dy, dx, sigma = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    >>> get_profile("gaussian")(dy, dx, sigma)
    tensor([1.0000, 0.3679])
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

__all__ = ["Profile", "PROFILES", "flat", "gaussian", "get_profile", "sigma_pair"]

#: ``f(dy, dx, sigma) -> falloff``: float tensors of one shape (or broadcastable) in, the falloff out.
Profile = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flat(dy: torch.Tensor, dx: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``f = 1`` on every window cell (the dense version); ``dx`` and ``sigma`` are unused."""
    return torch.ones_like(dy)


def gaussian(dy: torch.Tensor, dx: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``f = exp(-(dy^2 + dx^2) / (2 sigma^2))``: 1 at the window centre, falling off with the distance in cells."""
    return torch.exp(-(dy ** 2 + dx ** 2) / (2 * sigma * sigma))


#: Profile name -> function; the names `sparse_bias.window_bias` and `sparse_bias.flex.flex_score_mod` accept.
PROFILES: Dict[str, Profile] = {"flat": flat, "gaussian": gaussian}


def get_profile(name: str) -> Profile:
    """The function registered as ``name``; ValueError naming the choices for an unknown name."""
    try:
        return PROFILES[name]
    except (KeyError, TypeError):
        raise ValueError(f"profile must be one of {tuple(PROFILES)}, got {name!r}") from None


def sigma_pair(sigma) -> Optional[Tuple[float, float]]:
    """The checked ``(bev, cam)`` widths of a ``sigma`` argument (a positive number or a pair of them), or None
    for None (the caller's default: half the window's half-size)."""
    if isinstance(sigma, (tuple, list)):
        if len(sigma) != 2:
            raise ValueError(f"sigma must be a number or a (bev, cam) pair, got {sigma!r}")
        pair = tuple(sigma)
    else:
        pair = (sigma, sigma)
    if sigma is None:
        return None
    for s in pair:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
            raise ValueError(f"sigma must be a positive number or a (bev, cam) pair, got {sigma!r}")
    return pair
