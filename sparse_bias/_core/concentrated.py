"""Concentrated attention: q / k whose attention mass sits inside each query's window, as in a trained detector.

Random q / k put about ``|W| / K`` (~1 %) of a query's attention on its window; a trained detector attends near
the object, i.e. mostly inside the window. `concentrated_qk` builds q and k for a `WindowIndex` so that the
*unbiased* attention of each query puts a chosen share of its mass on its window keys; `signed_bias` gives a
flat bias of chosen magnitude and signs. Together they make the regime where a negative bias removes most of a
row's mass -- the stress case of an additive correction. Used by the first-use self-checks (`sparse_bias._core.dispatch`),
the self-test, the benchmarks and the tests.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..bias import SparseBias, window_bias
from ..windows import WindowIndex

__all__ = ["concentrated_qk", "signed_bias", "window_share"]


def window_share(q: torch.Tensor, k: torch.Tensor, win: WindowIndex, scale: Optional[float] = None) -> torch.Tensor:
    """``[B, H, Q]`` float64: the share of each query's unbiased attention mass on its window keys (0 for an
    empty window). q ``[B, H, Q, D]``, k ``[B, H, K, D]``; O(Q K D) (a dense evaluation: for tests and tools)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale                # [B, H, Q, K]
    mask = win.to_dense_mask().unsqueeze(1)                                          # [B, 1, Q, K]
    lse = torch.logsumexp(s, -1)
    inside = torch.logsumexp(s.masked_fill(~mask, -math.inf), -1)
    return torch.exp(inside - lse).nan_to_num(0.0)


def _owners(win: WindowIndex) -> torch.Tensor:
    """``[B, K]`` long: for each key, one query whose window holds it (the last in index order), -1 for none."""
    b, nq, nk = win.batch_size, win.num_queries, win.layout.num_keys
    rows = torch.repeat_interleave(torch.arange(b * nq, device=win.device), win.indptr.diff())
    slot = (rows // nq) * nk + win.key.long()
    own = torch.full((b * nk,), -1, dtype=torch.long, device=win.device)
    own.scatter_reduce_(0, slot, rows % nq, reduce="amax")
    return own.view(b, nk)


def concentrated_qk(win: WindowIndex, heads: int, dim: int, share: float, *, iters: int = 6,
                    generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(q [B, H, Q, D], k [B, H, K, D])`` whose unbiased attention puts about ``share`` of each query's mass
    on its window keys (the median over rows is within a few percent of ``share``; rows vary around it).

    Each query gets a random direction ``u``, ``q = sqrt(D) u``; every window key is owned by one query of its windows
    and leans towards its owner's direction, ``k = noise + t u_owner``, with ``t`` per query solved so that the share
    comes out right (a few logit-space Newton steps: ``t`` shifts the window scores of its query). ``share`` in
    ``(0, 1)``; the scale is the default ``1 / sqrt(D)``.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share must be in (0, 1), got {share!r}")
    b, nq, nk = win.batch_size, win.num_queries, win.layout.num_keys
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    u = torch.randn(b, heads, nq, dim, generator=gen, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)
    q = u * math.sqrt(dim)
    noise = torch.randn(b, heads, nk, dim, generator=gen, dtype=torch.float64)
    own = _owners(win)                                                               # [B, K]
    owned = own >= 0
    idx = own.clamp(min=0).view(b, 1, nk, 1).expand(b, heads, nk, dim)
    direction = torch.gather(u, 2, idx) * owned.view(b, 1, nk, 1)                    # [B, H, K, D]
    t = torch.zeros(b, heads, nq, dtype=torch.float64)
    target = math.log(share / (1.0 - share))
    for _ in range(iters):
        shift = torch.gather(t, 2, own.clamp(min=0).view(b, 1, nk).expand(b, heads, nk)).unsqueeze(-1)
        k = noise + shift * direction
        got = window_share(q, k, win).clamp(1e-9, 1 - 1e-9)
        t = t + (target - torch.log(got / (1 - got)))   # d logit / d t = 1 without cross-talk
    shift = torch.gather(t, 2, own.clamp(min=0).view(b, 1, nk).expand(b, heads, nk)).unsqueeze(-1)
    k = noise + shift * direction
    return q.to(dtype), k.to(dtype)


def signed_bias(win: WindowIndex, magnitude: float = 5.0, negative: float = 1.0, *, heads: Optional[int] = None,
                generator: Optional[torch.Generator] = None, dtype: torch.dtype = torch.float64) -> SparseBias:
    """A flat `window_bias` of ``magnitude * w`` with ``|w|`` uniform in [0.8, 1] per query (and head when
    ``heads`` is given), negative for a ``negative`` fraction of the queries (0: all positive, 1: all negative),
    as CMTTEST's clamped scale (up to 5) times tanh AQR weights of either sign give it."""
    if not 0.0 <= negative <= 1.0:
        raise ValueError(f"negative must be in [0, 1], got {negative!r}")
    gen = generator if generator is not None else torch.Generator().manual_seed(1)
    shape = (win.batch_size, win.num_queries) + ((heads,) if heads else ())
    size = lambda: 0.8 + 0.2 * torch.rand(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    weights = []
    for _ in ("bev", "cam"):
        sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < negative, -1.0, 1.0)
        weights.append((sign * size()).to(dtype))
    bev = weights[0] if win.bev_pos is not None else None
    cam = weights[1] if win.cam_pos is not None else None
    return window_bias(win, bev, cam, scale=magnitude)
