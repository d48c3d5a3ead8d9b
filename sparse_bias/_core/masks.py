"""Attention masks: the conventions of each entry point's mask arguments, one additive float mask from them, and
the checks of their values (a float 0/1 mask is an error, a mask blocking everything a warning; docs/masks.md)."""
from __future__ import annotations

import math
import os
import sys
import warnings
from typing import NamedTuple, Optional

import torch

from .call import compute_dtype as _compute_dtype
from .checks import check_device, check_tensor, debug_checks_enabled
from .compat import is_compiling, is_exporting

__all__ = ["MaskConventions", "functional_masks", "module_masks", "additive_mask", "normalize_key_padding_mask",
           "mask_convention", "check_mask_values"]


def normalize_key_padding_mask(key_padding_mask, batch: int, num_keys: int, device) -> Optional[torch.Tensor]:
    """A key padding mask as ``torch.nn.MultiheadAttention`` takes it, made canonical: bool ``[B, K]`` (True =
    ignore) as is, uint8 (nonzero = ignore) as bool, an additive float mask as is (an all-zero float mask, as CMT
    passes ``memory.new_zeros(bs, K)``, is applied as a mask: telling it from a real one would read device
    values, a host sync per call; pass None or a bool mask for the mask-free kernels)."""
    if key_padding_mask is None:
        return None
    check_tensor("key_padding_mask", key_padding_mask, ndim=(2,))
    if tuple(key_padding_mask.shape) != (batch, num_keys):
        raise ValueError(f"key_padding_mask must be [B, K] = [{batch}, {num_keys}], "
                         f"got {tuple(key_padding_mask.shape)}")
    check_device("key_padding_mask", key_padding_mask, device, "q")
    if key_padding_mask.dtype == torch.uint8:
        key_padding_mask = key_padding_mask.bool()
    if key_padding_mask.is_floating_point():
        return key_padding_mask
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = ignore), uint8 (nonzero = ignore) or an additive "
                        f"float mask, got {key_padding_mask.dtype}")
    return key_padding_mask


def additive_mask(q, k, key_padding_mask, attn_mask,
                  conventions: Optional["MaskConventions"] = None) -> Optional[torch.Tensor]:
    """One additive float mask, 4-D and broadcastable to ``[B, H, Q, K]`` (``-inf`` = masked), or None.

    ``attn_mask`` comes in the SDPA convention (bool True = attend; the modules convert theirs first). With
    ``conventions`` (the public entry points), the masks' values are checked by `check_mask_values`, whose messages
    say which convention each argument of ``conventions.owner`` follows."""
    bsz, heads, nq, _ = q.shape
    nk = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    mask = None
    key_padding_mask = normalize_key_padding_mask(key_padding_mask, bsz, nk, q.device)
    if key_padding_mask is not None:
        if key_padding_mask.dtype == torch.bool:
            mask = torch.zeros(bsz, 1, 1, nk, dtype=cdt, device=q.device).masked_fill(
                key_padding_mask.view(bsz, 1, 1, nk), float("-inf"))
        else:
            mask = key_padding_mask.detach().to(cdt).view(bsz, 1, 1, nk)
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, ndim=(2, 3, 4))
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, (bsz, heads, nq, nk)) == (bsz, heads, nq, nk)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask must broadcast to [B, H, Q, K] = [{bsz}, {heads}, {nq}, {nk}], "
                             f"got shape {tuple(attn_mask.shape)}")
        check_device("attn_mask", attn_mask, q.device, "q")
        while attn_mask.dim() < 4:
            attn_mask = attn_mask.unsqueeze(0)
        if attn_mask.dtype == torch.bool:      # torch SDPA convention: True = takes part in attention
            am = torch.zeros(attn_mask.shape, dtype=cdt, device=q.device).masked_fill(~attn_mask, float("-inf"))
        elif attn_mask.is_floating_point():
            am = attn_mask.detach().to(cdt)
        else:
            raise TypeError(f"attn_mask must be {_attn_words(conventions)}, got {attn_mask.dtype}")
        mask = am if mask is None else mask + am
    if conventions is not None:
        check_mask_values(conventions, key_padding_mask, attn_mask, mask)
    return mask


# ---------------------------------------------------------------------------------------------------
# mask values: a 0/1 float mask is an error, a mask blocking everything a warning


class MaskConventions(NamedTuple):
    """Whose masks `check_mask_values` checks, for its messages.

    Attributes:
        owner: the entry point as the user calls it (``"sparse_bias_attention"``, ``"SparseBiasMultiheadAttention"``).
        attn_true_blocks: the owner's bool ``attn_mask`` has True = blocked (mmcv's and ``nn.MultiheadAttention``'s
            convention: the modules) rather than True = attend (``scaled_dot_product_attention``'s: the functional ops).
    """
    owner: str
    attn_true_blocks: bool = False


def functional_masks(owner: str) -> MaskConventions:
    """The conventions of a functional op (bool ``attn_mask`` True = attend)."""
    return MaskConventions(owner, False)


def module_masks(owner: str) -> MaskConventions:
    """The conventions of an ``nn`` module (bool ``attn_mask`` True = blocked, as mmcv's ``MultiheadAttention``)."""
    return MaskConventions(owner, True)


_ADDITIVE = "an additive float mask (its values are added to the scores: 0 keeps a pair, -inf blocks it)"
_KPM_WORDS = ("bool with True = ignore that key (the convention of torch's nn.MultiheadAttention and mmcv), "
              "uint8 (nonzero = ignore) or " + _ADDITIVE)


def _attn_words(conventions: Optional[MaskConventions]) -> str:
    if conventions is not None and conventions.attn_true_blocks:
        return ("bool with True = blocked (the convention of mmcv's MultiheadAttention and torch's "
                "nn.MultiheadAttention), uint8 (nonzero = blocked) or " + _ADDITIVE)
    return "bool with True = attend (the convention of torch's scaled_dot_product_attention) or " + _ADDITIVE


def mask_convention(conventions: MaskConventions, name: str) -> str:
    """``"<owner>'s <name> is <its convention in words>"``: the sentence every mask message carries."""
    words = _KPM_WORDS if name == "key_padding_mask" else _attn_words(conventions)
    return f"{conventions.owner}'s {name} is {words}"


def _zero_one_error(conventions: MaskConventions, name: str) -> ValueError:
    if name == "key_padding_mask":
        fix = ("if 1.0 marks the padded keys, pass key_padding_mask.bool(); if it marks the keys to keep, pass "
               "key_padding_mask == 0")
    elif conventions.attn_true_blocks:
        fix = "if 1.0 marks blocked pairs, pass attn_mask.bool(); if it marks the pairs to attend, pass attn_mask == 0"
    else:
        fix = "if 1.0 marks the pairs to attend, pass attn_mask.bool(); if it marks blocked pairs, pass attn_mask == 0"
    return ValueError(f"{name} is a float mask holding only 0.0 and 1.0: a float mask is additive (0 keeps a pair, "
                      f"-inf blocks it), so its 1.0 entries would add +1 to those scores and block nothing. "
                      f"{mask_convention(conventions, name)}. {fix[0].upper() + fix[1:]} (or, as an additive "
                      f"mask, {name}.masked_fill({name} == 1, float('-inf')) where 1.0 means blocked)")


def _all_blocked_warning(conventions: MaskConventions, names, bool_names) -> str:
    what = " and ".join(names)
    verb = "blocks" if len(names) == 1 else "together block"
    rules = "; ".join(mask_convention(conventions, n) for n in names)
    hints = []
    for n in bool_names:
        if n == "key_padding_mask":
            hints.append("if True was meant to mark the keys to keep, pass ~key_padding_mask")
        elif conventions.attn_true_blocks:
            hints.append("if True was meant to mark the pairs to attend (scaled_dot_product_attention's "
                         "convention), pass ~attn_mask")
        else:
            hints.append("if True was meant to mark blocked pairs (mmcv's and nn.MultiheadAttention's "
                         "convention), pass ~attn_mask")
    outcome = ("every attention output is zeros (the library's convention for fully masked rows; "
               "nn.MultiheadAttention gives NaN)")
    if conventions.attn_true_blocks:
        outcome += f", so {conventions.owner} returns identity + out_proj.bias"
    hint = (" -- " + "; ".join(hints)) if hints else ""
    return f"{what} {verb} every key of every query of this call: {outcome}. {rules}{hint}"


#: (argument, is float) whose device values `check_mask_values` has read once in this process
_READ_ON_DEVICE: set = set()


def _plain(t: torch.Tensor) -> bool:
    """A tensor whose values can be read: no fake / functorch-wrapped tensor of a tracing transform."""
    if type(t) is not torch.Tensor:
        return False
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return not (wrapped is not None and wrapped(t))


def _reads_mask_values(masks) -> bool:
    """Whether this call reads the masks' values (docs/masks.md, "When the values are checked"): always under the
    debug switch; else every call for masks in CPU memory (no device to wait for), and on another device once per
    argument and kind (bool / float) per process -- one host sync on the first such call, none after it. Never
    while compiling, exporting or capturing a CUDA graph."""
    if is_compiling() or is_exporting() or not all(_plain(m) for _, m in masks):
        return False
    if debug_checks_enabled() or all(m.device.type == "cpu" for _, m in masks):
        return True
    keys = {(n, m.is_floating_point()) for n, m in masks if m.device.type != "cpu"}
    if keys <= _READ_ON_DEVICE:
        return False
    if any(m.is_cuda for _, m in masks) and torch.cuda.is_current_stream_capturing():
        return False
    _READ_ON_DEVICE.update(keys)
    return True


def check_mask_values(conventions: MaskConventions, key_padding_mask: Optional[torch.Tensor],
                      attn_mask: Optional[torch.Tensor], combined: Optional[torch.Tensor]) -> None:
    """Check what needs the masks' values, when `_reads_mask_values` says so: a float mask holding 1.0 and
    otherwise only 0.0 is a `ValueError` (an additive mask never means that: it is a 0/1 mask of some other
    convention); a mask -- or the two together -- blocking every key of every query is a ``UserWarning``; under
    the debug switch, NaN or ``+inf`` in a float mask is a `ValueError`. Every message names the argument and the
    convention ``conventions.owner`` reads it with.

    ``key_padding_mask`` is normalised (bool True = ignore, or float), ``attn_mask`` in the SDPA convention
    (bool True = attend), ``combined`` their additive sum."""
    masks = [(n, m) for n, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask))
             if m is not None and m.numel()]
    if not masks or not _reads_mask_values(masks):
        return
    stats = []
    for name, m in masks:
        if m.dtype == torch.bool:         # [all blocked]
            blocked = m.all() if name == "key_padding_mask" else ~m.any()
            stats.append(blocked.view(1).float())
        else:                             # [min, max]: all blocked <=> max = -inf; NaN and +inf show in max
            lo, hi = torch.aminmax(m.detach())
            stats.append(torch.stack([lo, hi]).float())
    both = len(masks) == 2 and combined is not None
    if both:
        stats.append(torch.isneginf(combined).all().view(1).float())
    values = torch.cat(stats).tolist()             # one read (a host sync only for a mask on a device)
    blocked, bool_blocked, i = [], [], 0
    for name, m in masks:
        if m.dtype == torch.bool:
            if values[i]:
                blocked.append(name)
                bool_blocked.append(name)
            i += 1
            continue
        lo, hi = values[i], values[i + 1]
        i += 2
        if debug_checks_enabled() and (math.isnan(hi) or hi == math.inf):
            what = "NaN" if math.isnan(hi) else "+inf"
            raise ValueError(f"{name} contains {what} values; an additive mask holds finite values and -inf "
                             f"(masked). {mask_convention(conventions, name)}")
        if hi == 1.0 and lo in (0.0, 1.0) and bool(((m == 0) | (m == 1)).all().tolist()):
            raise _zero_one_error(conventions, name)
        if hi == -math.inf:
            blocked.append(name)
    if not blocked and both and values[i]:
        blocked = [n for n, _ in masks]
        bool_blocked = [n for n, m in masks if m.dtype == torch.bool]
    if blocked:
        warnings.warn(_all_blocked_warning(conventions, blocked, bool_blocked), UserWarning,
                      stacklevel=_user_stacklevel())


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep     # sparse_bias/
_TORCH_MODULES_DIR = os.path.dirname(os.path.abspath(torch.nn.Module.__call__.__code__.co_filename)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning issued by this function's caller that points at the user's line: the
    first frame outside this package and torch's ``nn.Module`` call machinery."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith((_PACKAGE_DIR,
                                                                                       _TORCH_MODULES_DIR)):
        frame, level = frame.f_back, level + 1
    return level
