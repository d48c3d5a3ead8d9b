"""Exact sparse-bias attention: the public functions.

`sparse_bias_attention` computes dense global scores from an unmodified flash kernel plus an exact
sparse correction over the window entries (the math is in `sparse_bias._core.correction`; a
`ModalityBias` takes `sparse_bias._core.modality`); `dense_bias_attention` is the dense
reference; `select_backend` says which backend runs the window terms (chosen, and self-checked on GPU
paths, by `sparse_bias._core.dispatch`).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._core.dispatch import choose_backend
from ._core.exact_rows import EXACT_ROW_RATIO
from ._core.inputs import AttentionInputs
from ._core.masks import functional_masks
from ._core.ops import ModalityAttention, SparseBiasAttention
from ._core.reference import dense_attention
from .backends import backend_names
from .bias import ModalityBias, SparseBias

__all__ = ["sparse_bias_attention", "dense_bias_attention", "select_backend", "attend", "EXACT_ROW_RATIO",
           "BACKEND_NAMES"]

#: The ``backend=`` choices of `sparse_bias_attention` (from the registry `sparse_bias.backends.BACKENDS`).
BACKEND_NAMES = ("auto",) + backend_names("correction") + ("dense",)

_SPARSE_MASKS = functional_masks("sparse_bias_attention")
_DENSE_MASKS = functional_masks("dense_bias_attention")


def select_backend(q: torch.Tensor, bias: Union[SparseBias, ModalityBias, torch.Tensor, None] = None,
                   backend: str = "auto") -> Tuple[str, str]:
    """The backend `sparse_bias_attention` will use, and why.

    Args:
        q: the query tensor (its device and dtype decide).
        bias: the bias argument (a dense tensor or None always takes the dense/plain path).
        backend: the requested backend.

    Returns:
        ``(name, reason)``. On a GPU path the chosen backend has passed its first-use self-check
        (`sparse_bias._core.dispatch`); one that fails it is skipped with a warning.

    Example:

        >>> import torch, sparse_bias as sb
        >>> win = sb.local_windows(sb.KeyLayout(bev_shape=(4, 4)), torch.tensor([[[1, 1]]]), None, 3)
        >>> name, why = sb.select_backend(torch.zeros(1, 2, 1, 8), sb.window_bias(win, torch.ones(1, 1), None))
        >>> name in ("fused", "sparse")         # on a CPU: the compiled kernels when built, else PyTorch's CSR kernels
        True
    """
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    if bias is None:
        return "none", "no bias: plain attention through the dense kernel"
    if isinstance(bias, torch.Tensor):
        return "dense", "a dense bias tensor is added to the scores (the dense version's path)"
    if isinstance(bias, ModalityBias):
        if backend == "dense":
            return "dense", "requested: the bias is materialised"
        return "modality", "one bias per modality: one dense pass per key range, combined by log-sum-exp"
    if backend == "dense":
        return "dense", "requested: the bias is materialised"
    return choose_backend(q.device, q.dtype, q.shape[-1], backend, "correction")


# ---------------------------------------------------------------------------------------------------
# public functions


def dense_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dense_bias: Optional[torch.Tensor] = None,
                         key_padding_mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                         dropout_p: float = 0.0, scale: Optional[float] = None,
                         dropout_seed: Optional[int] = None) -> torch.Tensor:
    """The dense reference: ``softmax(q k^T * scale + dense_bias + masks) v``, written out plainly.

    Materialises the ``[B, H, Q, K]`` scores (the dense version's memory cost). Computed in the inputs'
    dtype, so it is also the "naive implementation at the same precision" for tolerance checks.

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]``.
        dense_bias: ``[B, Q, K]`` (shared by heads) or ``[B, H, Q, K]``, or None.
        key_padding_mask: ``[B, K]``: bool (True = ignore that key), uint8 (nonzero = ignore) or an additive
            float mask (0 = keep, ``-inf`` = ignore), as for `sparse_bias_attention`.
        attn_mask: bool (True = attend, the SDPA convention) or additive float, broadcastable to ``[B, H, Q, K]``.
            Mask values are checked as in `sparse_bias_attention` (docs/masks.md).
        dropout_p: attention dropout on the probabilities, with the counter-based mask of
            `sparse_bias.dense.dropout_keep` (``dropout_seed`` drawn from torch's RNG when None).
        scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, H, Q, D]``. A fully masked query row (every key masked, or no keys) gives zeros and zero gradients
        (docs/conventions.md).
    """
    inputs = AttentionInputs.of("dense", q, k, v, dense_bias, key_padding_mask=key_padding_mask,
                                attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, dropout_seed=dropout_seed,
                                conventions=_DENSE_MASKS)
    return dense_attention(q, k, v, dense_bias, inputs.call)


def sparse_bias_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          bias: Union[SparseBias, torch.Tensor, None] = None, *,
                          key_padding_mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                          dropout_p: float = 0.0, scale: Optional[float] = None, backend: str = "auto",
                          dropout_seed: Optional[int] = None) -> torch.Tensor:
    """Attention with a local additive bias, exact in forward and backward.

    Computes ``softmax(q k^T * scale + bias.to_dense() [+ masks]) v`` as dense global scores from an
    unmodified flash kernel plus an exact sparse correction over the window entries -- without ever
    materialising ``[B, (H,) Q, K]``.

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]`` (float32/float64/bfloat16/float16, one device).
        bias: a `SparseBias` (values ``[nnz]`` shared by heads or ``[nnz, H]``), a dense tensor
            ``[B, Q, K]`` / ``[B, H, Q, K]`` (taken through the dense path), or None (plain attention).
        key_padding_mask: ``[B, K]``: bool (True = ignore that key, the mmcv / nn.MultiheadAttention
            convention), uint8 (nonzero = ignore) or an additive float mask (0 = keep, ``-inf`` = ignore; all
            zeros, as CMT passes it, equals no mask).
        attn_mask: dense bool (True = attend, the ``scaled_dot_product_attention`` convention) or additive
            float mask (0 = keep, ``-inf`` = blocked) broadcastable to ``[B, H, Q, K]``; not differentiated.
            A float mask holding 1.0 and otherwise only 0.0 (either argument) is a `ValueError`: it is a 0/1 mask
            of some other convention, never an additive one. Masks blocking every key of every query give a
            ``UserWarning`` naming the argument (the output is zeros). These checks read the masks' values: every
            call for CPU tensors, once per process on a GPU (one host sync), every call under
            `sparse_bias.set_debug_checks` (docs/masks.md).
        dropout_p: attention dropout on the final (biased) probabilities, as in the dense reference; each
            (b, h, q, key) is kept or dropped by a counter-based hash of ``dropout_seed`` (drawn from torch's
            RNG when None), so the dense pass, the correction and the backward agree. The dense pass then
            runs on the compiled flash-style CPU kernel (Triton on CUDA; the chunked PyTorch kernel when neither
            is available; `sparse_bias.dense.dense_kernel_name` says which). Pass 0 at evaluation (modules do
            this for you).
        scale: softmax scale, default ``1 / sqrt(D)``; a finite number.
        dropout_seed: an int (any 64 bits) or None.
        backend: ``"auto"``, ``"fused"`` (the compiled C++/OpenMP kernels, CPU), ``"sparse"`` (PyTorch sparse CSR
            kernels), ``"triton"`` (fused Triton kernels, CUDA), ``"scatter"`` (torch-scatter segment
            ops), ``"torch"`` (native gather + index_add) or ``"dense"`` (materialise the bias; the reference).
            `select_backend` says what ``"auto"`` picks and why.

    Returns:
        ``[B, H, Q, D]`` in q's dtype. Gradients flow to q, k, v and ``bias.values`` (hence to the weights
        and scale behind them). The correction is accumulated in float32 (float64 for float64 input). A query
        whose keys are all masked (or K = 0) gets zeros and zero gradients, on every backend
        (docs/conventions.md). q, k, v and the output gradient may have any strides (transposed, sliced,
        expanded, strided last dim): inputs whose last dim is not unit-stride are copied once here.

    Example:

        >>> import torch, sparse_bias as sb
        >>> layout = sb.KeyLayout(bev_shape=(8, 8))
        >>> win = sb.local_windows(layout, torch.tensor([[[2, 3], [5, 5]]]), None, bev_window=3)
        >>> bias = sb.window_bias(win, torch.tensor([[1.0, -2.0]]), None)
        >>> q, k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 64, 4), torch.randn(1, 2, 64, 4)
        >>> out = sb.sparse_bias_attention(q, k, v, bias)
        >>> ref = sb.dense_bias_attention(q, k, v, bias.to_dense())
        >>> torch.allclose(out, ref, atol=1e-5)
        True
    """
    return attend(AttentionInputs.of("correction", q, k, v, bias, key_padding_mask=key_padding_mask,
                                     attn_mask=attn_mask, dropout_p=dropout_p, scale=scale, dropout_seed=dropout_seed,
                                     conventions=_SPARSE_MASKS), backend)


def attend(inputs: AttentionInputs, backend: str = "auto") -> torch.Tensor:
    """``[B, H, Q, D]``: `sparse_bias_attention` on a validated call (the `sparse_bias.nn` modules build theirs
    with their own mask conventions): the backend chosen, then the op's ``autograd.Function``."""
    name, _ = select_backend(inputs.q, inputs.bias, backend)
    q, k, v, bias, call = inputs.q, inputs.k, inputs.v, inputs.bias, inputs.call
    if name == "dense":
        return dense_attention(q, k, v, bias if isinstance(bias, torch.Tensor) else bias.to_dense(), call)
    if inputs.empty:                       # nothing to attend (K = 0: every row fully masked): zeros
        return inputs.zeros()
    if name == "none":
        return SparseBiasAttention.apply(q, k, v, None, [], call, "")
    if name == "modality":
        return ModalityAttention.apply(q, k, v, bias.values, bias.ranges, call)
    return SparseBiasAttention.apply(q, k, v, bias.values, bias.index.entries().as_args(), call, name)
