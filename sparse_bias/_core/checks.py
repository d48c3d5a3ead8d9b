"""Small input-validation helpers shared by the public functions.

Every error names the argument and the offending value, so a user can find the bad call quickly.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, x, *, ndim: Optional[Sequence[int]] = None, floating: Optional[bool] = None,
                 integer: Optional[bool] = None, signed: Optional[bool] = None) -> torch.Tensor:
    """Check that ``x`` is a tensor with one of the allowed ranks and the right kind of dtype.

    ``signed=True`` (with ``integer=True``) refuses unsigned integer dtypes: positions and window sizes use
    -1 / negative values to mean "none", which an unsigned tensor cannot hold (it silently wraps to 255...)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in tuple(ndim):
        allowed = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name} must have {allowed} dimensions, got shape {tuple(x.shape)}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if integer and x.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got dtype {x.dtype}")
    if signed and not x.dtype.is_signed:
        raise TypeError(f"{name} must have a signed integer dtype (e.g. torch.long), got dtype {x.dtype}: an "
                        f"unsigned tensor cannot hold negative values such as -1 = 'no window' (use .long())")
    return x


def check_device(name: str, x: torch.Tensor, device: torch.device, other: str) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but {other} is on {device}")


_DEBUG = [os.environ.get("SPARSE_BIAS_DEBUG", "0") not in ("", "0")]


def set_debug_checks(enabled: bool) -> None:
    """Turn the debug checks of the attention ops on or off (default: the ``SPARSE_BIAS_DEBUG`` environment
    variable, off when unset).

    With them on, every call also checks what needs device values -- q, k, v and bias values finite, float masks
    free of NaN / ``+inf``, a bias on a different index object holding the same entries -- and raises a `ValueError`
    naming the argument; the mask checks that otherwise read a device mask once per process (a 0/1 float mask,
    a mask blocking every key: docs/masks.md) run on every call too. Each check reads a device
    value (a host synchronisation on a GPU), which is why they are off by default: without them a NaN bias gives a
    NaN output, never a plausible wrong one (docs/gpu.md)."""
    _DEBUG[0] = bool(enabled)


def debug_checks_enabled() -> bool:
    """Whether `set_debug_checks` (or ``SPARSE_BIAS_DEBUG=1``) turned the per-call device-value checks on."""
    return _DEBUG[0]


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise if ``x`` holds NaN (or infinite) values: they would silently poison the softmax. Reads a device value:
    callers on the attention path run it only under `debug_checks_enabled`."""
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "infinite"
        raise ValueError(f"{name} contains {bad} values")


def debug_check_finite(name: str, x: torch.Tensor) -> None:
    """`check_finite` under the debug switch only (`set_debug_checks`): the attention path's values are checked
    without a host sync by default (a NaN there gives a NaN output, never a plausible wrong one)."""
    if _DEBUG[0]:
        check_finite(name, x)


def check_window_size(name: str, size) -> None:
    """A window size is an odd non-negative int (0 = no window) or an integer tensor of such values."""
    if isinstance(size, torch.Tensor):
        check_tensor(name, size, integer=True, signed=True)
        if size.numel():
            if bool((size < 0).any()):
                raise ValueError(f"{name} must be >= 0, got minimum {int(size.min())}")
            even = (size > 0) & (size % 2 == 0)
            if bool(even.any()):
                raise ValueError(f"{name} must hold odd sizes (or 0 = no window), got {int(size[even][0])}")
        return
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{name} must be an odd int or a LongTensor [B, Q], got {type(size).__name__}")
    if size < 0 or (size > 0 and size % 2 == 0):
        raise ValueError(f"{name} must be an odd positive int (or 0 = no window), got {size}")


def check_shape_2d(name: str, shape, n: int):
    """Normalise a shape tuple of ``n`` positive ints (or None)."""
    if shape is None:
        return None
    if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                         for s in shape):
        raise TypeError(f"{name} must be a tuple of {n} ints or None, got {shape!r}")
    shape = tuple(shape)
    if len(shape) != n or any(s <= 0 for s in shape):
        raise ValueError(f"{name} must be a tuple of {n} positive ints or None, got {shape!r}")
    return shape


def parse_to(*args, **kwargs):
    """``(device or None, dtype or None)`` of ``Tensor.to``-style arguments (``device``, ``dtype``, both, a
    tensor, or keywords), with clear errors."""
    try:
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"to() takes a device, a dtype, both, or a tensor (like Tensor.to); got args={args!r}, "
                        f"kwargs={kwargs!r} ({exc})") from None
    return (None if device is None else torch.device(device)), dtype


def cuda_device(device=None) -> torch.device:
    """The device of ``.cuda(device)``: an index, a device, a string, or None (the current CUDA device)."""
    if isinstance(device, int):
        return torch.device("cuda", device)
    return torch.device(device or "cuda")
