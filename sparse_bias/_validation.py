"""Input validation shared by the attention entry points (`sparse_bias.attention`,
`sparse_bias.window_attention`): every error names the argument and the bad value."""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch

from ._compat import is_compiling
from ._checks import check_device, check_tensor, debug_check_finite, debug_checks_enabled
from .bias import ModalityBias, SparseBias
from ._call import compute_dtype as _compute_dtype


def check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=(4,), floating=True)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, H, K, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, H, Q, D] and k [B, H, K, D] disagree: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_device("k", k, q.device, "q")
    check_device("v", v, q.device, "q")


def check_batch_first(bias, name="bias"):
    """The functional ops take the batch-first bias only: its sequence-first view would be read batch-first."""
    if bias.seq_first:
        raise ValueError(f"{name} is the sequence-first view {list(bias.shape)} (bias.transpose(0, 1)); this op "
                         f"takes q [B, H, Q, D] and the batch-first bias: pass {name}.transpose(0, 1) (the "
                         "sparse_bias.nn modules take the sequence-first view)")


def check_sparse_bias(bias: SparseBias, q, k):
    check_batch_first(bias)
    idx = bias.index
    bsz, heads, nq, _ = q.shape
    if (idx.batch_size, idx.num_queries, idx.layout.num_keys) != (bsz, nq, k.shape[2]):
        raise ValueError(f"bias is for [B, Q, K] = [{idx.batch_size}, {idx.num_queries}, {idx.layout.num_keys}] "
                         f"but q, k give [{bsz}, {nq}, {k.shape[2]}]")
    if bias.num_heads is not None and bias.num_heads != heads:
        raise ValueError(f"bias has per-head values for H = {bias.num_heads} but q has {heads} heads")
    check_device("bias", bias.values, q.device, "q")
    idx.validate()                                    # keys in range, ascending, unique: once per index object
    debug_check_finite("bias.values", bias.values.detach())


def check_modality_bias(bias: ModalityBias, q, k):
    check_batch_first(bias)
    bsz, heads, nq, _ = q.shape
    if tuple(bias.values.shape[:2]) != (bsz, nq) or bias.layout.num_keys != k.shape[2]:
        raise ValueError(f"bias is for [B, Q, K] = [{bias.values.shape[0]}, {bias.values.shape[1]}, "
                         f"{bias.layout.num_keys}] but q, k give [{bsz}, {nq}, {k.shape[2]}]")
    if bias.num_heads is not None and bias.num_heads != heads:
        raise ValueError(f"bias has per-head values for H = {bias.num_heads} but q has {heads} heads")
    check_device("bias", bias.values, q.device, "q")
    debug_check_finite("bias.values", bias.values.detach())


def check_dense_bias(bias: torch.Tensor, q, k):
    check_tensor("bias", bias, ndim=(3, 4), floating=True)
    bsz, heads, nq, _ = q.shape
    expected = [(bsz, nq, k.shape[2]), (bsz, heads, nq, k.shape[2]), (bsz, 1, nq, k.shape[2])]
    if tuple(bias.shape) not in expected:
        raise ValueError(f"a dense bias must be [B, Q, K] = {list(expected[0])} or [B, H, Q, K] = "
                         f"{list(expected[1])}, got shape {tuple(bias.shape)}")
    check_device("bias", bias, q.device, "q")
    debug_check_finite("bias", bias.detach())


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
        _check_additive("key_padding_mask", key_padding_mask)
        return key_padding_mask
    if key_padding_mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be bool (True = ignore), uint8 (nonzero = ignore) or an additive "
                        f"float mask, got {key_padding_mask.dtype}")
    return key_padding_mask


def additive_mask(q, k, key_padding_mask, attn_mask) -> Optional[torch.Tensor]:
    """One additive float mask, 4-D and broadcastable to ``[B, H, Q, K]`` (``-inf`` = masked), or None."""
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
            _check_additive("attn_mask", attn_mask)
            am = attn_mask.detach().to(cdt)
        else:
            raise TypeError(f"attn_mask must be bool (True = attend) or floating point, got {attn_mask.dtype}")
        mask = am if mask is None else mask + am
    return mask


def _check_additive(name: str, mask: torch.Tensor) -> None:
    """An additive float mask may hold finite values and ``-inf`` (= masked); NaN and ``+inf`` would poison the
    softmax (``+inf`` is no mask convention of torch). Checked under the debug switch only (a device read); without
    it such a mask gives NaN outputs, as in ``scaled_dot_product_attention``."""
    if not debug_checks_enabled():
        return
    bad = torch.isnan(mask) | torch.isposinf(mask)
    if bool(bad.any()):
        what = "NaN" if bool(torch.isnan(mask).any()) else "+inf"
        raise ValueError(f"{name} contains {what} values; an additive mask holds finite values and -inf (masked)")


def check_scale(scale, q) -> float:
    """The softmax scale: ``1 / sqrt(D)`` by default (1 for ``D = 0``), else a finite number."""
    if scale is None:
        return q.shape[-1] ** -0.5 if q.shape[-1] else 1.0
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    return float(scale)


def check_seed(seed) -> None:
    """A dropout seed is None (drawn from torch's RNG) or an integer (any, negative and >= 2^63 included)."""
    if seed is None:
        return
    try:
        if isinstance(seed, bool):
            raise TypeError
        operator.index(seed)
    except TypeError:
        raise TypeError(f"dropout_seed must be an int or None, got {seed!r} ({type(seed).__name__})") from None


def dropout_seed(dropout_p: float, seed) -> int:
    """The seed a call uses: 0 without dropout, else ``seed`` or a fresh draw from torch's RNG."""
    check_seed(seed)
    if dropout_p == 0:
        return 0
    return draw_seed() if seed is None else operator.index(seed)


def check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def zeros_like_output(q, k, v, values=None) -> torch.Tensor:
    """``[B, H, Q, D]`` zeros for an empty problem, connected to every input (zero gradients reach them)."""
    zero = 0 * q.sum() + 0 * k.sum() + 0 * v.sum() + (0 if values is None else 0 * values.sum())
    return q.new_zeros(q.shape[:3] + (v.shape[-1],)) + zero.to(q.dtype)


def draw_seed():
    """A fresh dropout seed from torch's CPU generator (reproducible under ``torch.manual_seed``). Read with
    ``tolist``: a CPU tensor, so never a device synchronisation. Inside a compiled graph the seed stays a CPU
    tensor the op reads when it runs (a Python int there would be frozen into the graph)."""
    seed = torch.randint(0, 2**62, (1,))
    if is_compiling():
        return seed.view(())
    return seed.tolist()[0]


