"""The inputs record of an attention call: every argument validated once, where the call enters the library.

xformers' ``Inputs`` is the model: the public functions (`sparse_bias.sparse_bias_attention`,
`sparse_bias.dense_bias_attention`, `sparse_bias.window_attention`, and the `sparse_bias.nn` modules through them)
build one `AttentionInputs` with `AttentionInputs.of`, which checks q / k / v, the bias, the window index, the masks,
the scale, the dropout probability and seed -- every error names the argument and the bad value -- and holds the
`Call` record the ops take. Nothing below it checks an argument again. `AttentionInputs.not_supported_reasons` gives
every reason a backend cannot take the call.
"""
from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass
from typing import List, Optional, Union

import torch

from .call import Call
from .checks import check_device, check_tensor, debug_check_finite
from .compat import autocast_dtype, is_compiling
from .masks import MaskConventions, additive_mask
from ..backends import BACKENDS, OPS
from ..bias import ModalityBias, SparseBias
from ..windows import WindowIndex

__all__ = ["AttentionInputs"]

#: What ``op`` an `AttentionInputs` is for: the window terms of the correction, window attention, or the dense
#: reference (`sparse_bias.dense_bias_attention`).
INPUT_OPS = OPS + ("dense",)


@dataclass(frozen=True, eq=False)
class AttentionInputs:
    """One attention call's arguments, validated.

    Attributes:
        op: ``"correction"`` (`sparse_bias.sparse_bias_attention`), ``"window"`` (`sparse_bias.window_attention`)
            or ``"dense"`` (`sparse_bias.dense_bias_attention`).
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]``.
        bias: a `SparseBias`, a `ModalityBias`, a dense ``[B, (H,) Q, K]`` tensor, or None.
        win: the `WindowIndex` of window attention (None for the other ops).
        call: the `Call` record: scale, the additive mask ``[B|1, H|1, Q|1, K]`` (or None), dropout and its seed.
    """

    op: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    bias: Union[SparseBias, ModalityBias, torch.Tensor, None]
    win: Optional[WindowIndex]
    call: Call

    @classmethod
    def of(cls, op: str, q, k, v, bias=None, win=None, *, key_padding_mask=None, attn_mask=None, dropout_p=0.0,
           scale=None, dropout_seed=None, conventions: Optional[MaskConventions] = None) -> "AttentionInputs":
        """Validate a call's arguments (errors name the argument) and build its record; ``conventions`` say whose
        mask conventions the mask checks' messages name (None: the masks' values are not checked)."""
        if op not in INPUT_OPS:
            raise ValueError(f"op must be one of {INPUT_OPS}, got {op!r}")
        check_qkv(q, k, v)
        q, k, v = autocast_inputs(q, k, v)
        if op == "window":
            check_window(win, q, k)
        scale = check_scale(scale, q)
        check_dropout(dropout_p)
        check_bias(op, bias, q, k, win)
        mask = additive_mask(q, k, key_padding_mask, attn_mask, conventions)
        call = Call.of(q, scale, mask, dropout_p, seed_of_call(dropout_p, dropout_seed))
        return cls(op, q, k, v, bias, win, call)

    @property
    def values(self) -> Optional[torch.Tensor]:
        """The bias values (``[nnz]`` / ``[nnz, H]`` of a `SparseBias`, ``[B, Q, M(, H)]`` of a `ModalityBias`)."""
        return None if self.bias is None or isinstance(self.bias, torch.Tensor) else self.bias.values

    @property
    def empty(self) -> bool:
        """Nothing to attend (no queries, no keys, or every window empty): the output is zeros (`zeros`)."""
        if self.q.numel() == 0 or self.k.shape[2] == 0:
            return True
        return self.op == "window" and self.win.nnz == 0

    def zeros(self) -> torch.Tensor:
        """``[B, H, Q, D]`` zeros connected to every input (zero gradients reach them)."""
        q, k, v, values = self.q, self.k, self.v, self.values
        zero = 0 * q.sum() + 0 * k.sum() + 0 * v.sum() + (0 if values is None else 0 * values.sum())
        return q.new_zeros(q.shape[:3] + (v.shape[-1],)) + zero.to(q.dtype)

    def not_supported_reasons(self, backend: str) -> List[str]:
        """Every reason the registered ``backend`` cannot evaluate this call's window terms (empty: it can)."""
        return BACKENDS[backend].not_supported_reasons(self.q.device, self.q.dtype, self.q.shape[-1], self.op)


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
    for name, t in (("q", q), ("k", k), ("v", v)):
        debug_check_finite(name, t.detach())


def autocast_inputs(q, k, v):
    """q, k, v as ``scaled_dot_product_attention`` takes them under ``torch.autocast``: float32 / half tensors in the
    autocast dtype (float64 as it is), so the output has SDPA's dtype there; bias values keep theirs (they enter in
    the compute dtype, float32 for half inputs)."""
    target = autocast_dtype(q.device.type)
    if target is None or q.dtype == target or q.dtype == torch.float64:
        return q, k, v
    return q.to(target), k.to(target), v.to(target)


def check_batch_first(bias, name="bias"):
    """The functional ops take the batch-first bias only: its sequence-first view would be read batch-first."""
    if bias.seq_first:
        raise ValueError(f"{name} is the sequence-first view {list(bias.shape)} (bias.transpose(0, 1)); this op "
                         f"takes q [B, H, Q, D] and the batch-first bias: pass {name}.transpose(0, 1) (the "
                         "sparse_bias.nn modules take the sequence-first view)")


def check_sparse_bias(bias: SparseBias, q, k):
    check_batch_first(bias)
    idx = bias.index
    bsz, _, nq, _ = q.shape
    if (idx.batch_size, idx.num_queries, idx.layout.num_keys) != (bsz, nq, k.shape[2]):
        raise ValueError(f"bias is for [B, Q, K] = [{idx.batch_size}, {idx.num_queries}, {idx.layout.num_keys}] "
                         f"but q, k give [{bsz}, {nq}, {k.shape[2]}]")
    idx.validate()                                    # keys in range, ascending, unique: once per index object
    check_values(bias, q)


def check_modality_bias(bias: ModalityBias, q, k):
    check_batch_first(bias)
    bsz, _, nq, _ = q.shape
    if tuple(bias.values.shape[:2]) != (bsz, nq) or bias.layout.num_keys != k.shape[2]:
        raise ValueError(f"bias is for [B, Q, K] = [{bias.values.shape[0]}, {bias.values.shape[1]}, "
                         f"{bias.layout.num_keys}] but q, k give [{bsz}, {nq}, {k.shape[2]}]")
    check_values(bias, q)


def check_bias(op: str, bias, q, k, win: Optional[WindowIndex]) -> None:
    """The bias argument of ``op``: a `SparseBias`, a `ModalityBias`, a dense tensor or None for
    ``"correction"``; a `SparseBias` on ``win`` or None for ``"window"``; a dense tensor or None for ``"dense"``."""
    if bias is None:
        return
    if op == "window":
        check_bias_index(bias, win)
        check_values(bias, q)
    elif op == "dense":
        check_dense_bias(bias, q, k)
    elif isinstance(bias, SparseBias):
        check_sparse_bias(bias, q, k)
    elif isinstance(bias, ModalityBias):
        check_modality_bias(bias, q, k)
    elif isinstance(bias, torch.Tensor):
        check_dense_bias(bias, q, k)
    else:
        raise TypeError(f"bias must be a SparseBias, a ModalityBias, a dense tensor or None, "
                        f"got {type(bias).__name__}")


def check_window(win, q, k) -> None:
    """The window index of window attention: a `WindowIndex` for q's ``B``, ``Q`` and k's ``K``, on q's device,
    its entries validated (once per index object)."""
    if not isinstance(win, WindowIndex):
        raise TypeError(f"win must be a WindowIndex (the local attention mask), got {type(win).__name__}")
    bsz, _, nq, _ = q.shape
    if (win.batch_size, win.num_queries) != (bsz, nq):
        raise ValueError(f"win is for [B, Q] = [{win.batch_size}, {win.num_queries}] but q [B, H, Q, D] gives "
                         f"[{bsz}, {nq}]")
    if win.layout.num_keys != k.shape[2]:
        raise ValueError(f"win indexes a layout of {win.layout.num_keys} keys ({win.layout!r}) but k [B, H, K, D] "
                         f"has K = {k.shape[2]}")
    if win.device != q.device:
        raise ValueError(f"win is on {win.device} but q is on {q.device}")
    win.validate()                                    # keys in range, ascending, unique: once per index object


def check_bias_index(bias, win: WindowIndex) -> None:
    """A window attention bias: a `SparseBias` whose index has the entries of ``win`` (compared once per pair of
    index objects)."""
    if not isinstance(bias, SparseBias):
        raise TypeError(f"bias must be a SparseBias on the window index or None, got {type(bias).__name__}")
    check_batch_first(bias)
    idx = bias.index
    if idx is win or (idx.indptr is win.indptr and idx.key is win.key):
        return
    same = idx.nnz == win.nnz and idx.num_rows == win.num_rows and idx.layout == win.layout
    checked = win._cache.setdefault("same_entries", weakref.WeakSet())
    if same and idx not in checked:          # compare the entries once per pair of index objects (a host sync)
        same = bool(torch.equal(idx.indptr, win.indptr) and torch.equal(idx.key, win.key))
        if same:
            checked.add(idx)
    if not same:
        raise ValueError(f"bias is defined on another window index ({idx!r}) than win ({win!r}); build both "
                         "from the same WindowIndex")


def check_values(bias, q) -> None:
    """A `SparseBias` / `ModalityBias`'s values against q: heads and device; made usable for autograd."""
    if bias.num_heads is not None and bias.num_heads != q.shape[1]:
        raise ValueError(f"bias has per-head values for H = {bias.num_heads} but q has {q.shape[1]} heads")
    check_device("bias", bias.values, q.device, "q")
    bias._leave_inference_mode()                      # values made under torch.inference_mode(): copied once
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


def seed_of_call(dropout_p: float, seed) -> int:
    """The seed a call uses: 0 without dropout, else ``seed`` or a fresh draw from torch's RNG."""
    check_seed(seed)
    if dropout_p == 0:
        return 0
    return draw_seed() if seed is None else operator.index(seed)


def check_dropout(dropout_p):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")


def draw_seed():
    """A fresh dropout seed from torch's CPU generator (reproducible under ``torch.manual_seed``). Read with
    ``tolist``: a CPU tensor, so never a device synchronisation. Inside a compiled graph the seed stays a CPU
    tensor the op reads when it runs (a Python int there would be frozen into the graph)."""
    seed = torch.randint(0, 2**62, (1,))
    if is_compiling():
        return seed.view(())
    return seed.tolist()[0]


