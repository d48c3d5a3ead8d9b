"""Window attention: exact attention restricted to each query's window keys (a local attention mask).

``window_attention(q, k, v, win)`` equals ``softmax(q k^T * scale + bias + M) v`` where ``M`` is 0 for the
keys in a query's windows and ``-inf`` elsewhere -- ``scaled_dot_product_attention`` with MoME's dense
local attention mask (LAM) -- in O(nnz * D) time and memory: scores are computed only at the window entries
(SDDMM), the softmax runs over each query's CSR segment (segment max and sum) and the values are summed by a
sparse-dense product. No ``[B, (H,) Q, K]`` tensor exists at any point.

Backward, with ``p`` the window probabilities (times the dropout multipliers ``keep`` where dropped),
``ds_j = p_j (keep_j <g, v_j> - <g, o>)``: ``dq = scale sum_j ds_j k_j``, ``dk_j += scale ds_j q``,
``dv_j += p_j keep_j g`` and ``d bias_j = ds_j``.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch

from ._core.call import Call
from ._core.reference import dense_window_attention
from ._core.inputs import (MaskConventions, additive_mask, check_dropout, check_qkv, check_scale, check_sparse_bias,
                          functional_masks, zeros_like_output)
from ._core.inputs import dropout_seed as _call_seed
from ._core.ops import window_op
from .backends import backend_names
from .bias import SparseBias
from ._core.dispatch import choose_backend
from .windows import WindowIndex

__all__ = ["window_attention", "select_window_backend", "WINDOW_BACKENDS"]

#: The ``backend=`` choices of `window_attention` (from the registry `sparse_bias.backends.BACKENDS`).
WINDOW_BACKENDS = ("auto",) + backend_names("window") + ("dense",)

_WINDOW_MASKS = functional_masks("window_attention")


def select_window_backend(q: torch.Tensor, backend: str = "auto") -> Tuple[str, str]:
    """The backend `window_attention` will use for ``q``, and why: ``(name, reason)``.

    ``"auto"`` takes the first backend of `sparse_bias.backends.AUTO_ORDER` that can run window attention on q's
    device, dtype and head dim (on CUDA the fused ``"triton"`` kernels first, after their first-use self-check).
    """
    if backend not in WINDOW_BACKENDS:
        raise ValueError(f"backend must be one of {WINDOW_BACKENDS}, got {backend!r}")
    if backend == "dense":
        return "dense", "requested: the dense mask is materialised (the reference)"
    return choose_backend(q.device, q.dtype, q.shape[-1], backend, "window")


def _check_window(win, q, k):
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


def _check_bias_index(bias, win):
    if not isinstance(bias, SparseBias):
        raise TypeError(f"bias must be a SparseBias on the window index or None, got {type(bias).__name__}")
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


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, win: WindowIndex,
                     bias: Optional[SparseBias] = None, *, key_padding_mask: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, scale: Optional[float] = None, backend: str = "auto",
                     dropout_seed: Optional[int] = None) -> torch.Tensor:
    """Attention over each query's window keys only: the local attention mask (LAM), exact, in O(nnz * D).

    Equals ``softmax(q k^T * scale + bias.to_dense() + M) v`` with ``M = 0`` inside the windows of ``win`` and
    ``-inf`` outside -- i.e. ``scaled_dot_product_attention`` with the dense bool mask ``win.to_dense_mask()``
    -- in forward and backward (q, k, v and ``bias.values``), without any ``[B, (H,) Q, K]`` tensor.

    A query whose window is empty, or whose window keys are all padded, gets a **zero output and zero
    gradients** -- the library's convention for fully masked rows on every op and backend (docs/conventions.md).
    q, k, v and the output gradient may have any strides; those whose last dim is not unit-stride are copied.
    The index is validated on its first use (keys in range, ascending and unique per query).

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]`` (float32/float64/bfloat16/float16, one device).
        win: the `WindowIndex` (``B``, ``Q`` and the layout's ``K`` must match q and k). A
            ``WindowIndex`` built with ``bev_window=5, cam_window=15`` from MoME-style projections is MoME's LAM.
        bias: optional `SparseBias` on the same index (values ``[nnz]`` or ``[nnz, H]``): a local bias
            inside the local mask.
        key_padding_mask: ``[B, K]``: bool (True = ignore that key), uint8 (nonzero = ignore) or an additive
            float mask (0 = keep, ``-inf`` = ignore): ``torch.nn.MultiheadAttention``'s conventions. Its values
            are checked as in `sparse_bias.sparse_bias_attention`: a float 0/1 mask is a `ValueError`, a mask
            ignoring every key a ``UserWarning`` (docs/masks.md).
        dropout_p: attention dropout on the window probabilities, with the counter-based mask of
            `sparse_bias.sparse_bias_attention` (the same decisions as the dense reference for the same
            ``dropout_seed``; drawn from torch's RNG when None). Pass 0 at evaluation.
        scale: softmax scale, default ``1 / sqrt(D)``; a finite number.
        backend: ``"auto"``, ``"fused"`` (the compiled C++/OpenMP kernels, CPU), ``"triton"`` (fused Triton
            kernels, CUDA), ``"sparse"`` (PyTorch CSR kernels: ``sampled_addmm``, CSR @ dense), ``"scatter"``
            (gathered rows reduced with torch-scatter ``segment_csr``), ``"torch"`` (gathers, ``index_add_``,
            ``scatter_reduce``) or ``"dense"`` (the materialised mask; the reference).
            `select_window_backend` says what ``"auto"`` picks and why.

    Returns:
        ``[B, H, Q, D]`` in q's dtype; softmax statistics are kept in float32 (float64 for float64 input).

    Example:
        >>> import torch, sparse_bias as sb
        >>> layout = sb.KeyLayout(bev_shape=(8, 8))
        >>> win = sb.local_windows(layout, torch.tensor([[[2, 3], [5, 5]]]), None, bev_window=3)
        >>> q, k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 2, 64, 4), torch.randn(1, 2, 64, 4)
        >>> out = sb.window_attention(q, k, v, win)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=win.to_dense_mask()[:, None])
        >>> torch.allclose(out, ref, atol=1e-5)
        True
    """
    return _window_attention(q, k, v, win, bias, key_padding_mask, dropout_p, scale, backend, dropout_seed,
                             _WINDOW_MASKS)


def _window_attention(q, k, v, win, bias, key_padding_mask, dropout_p, scale, backend, dropout_seed,
                      conventions: Optional[MaskConventions]) -> torch.Tensor:
    """`window_attention`, its mask's values checked against ``conventions`` (the modules pass their own)."""
    check_qkv(q, k, v)
    _check_window(win, q, k)
    scale = check_scale(scale, q)
    check_dropout(dropout_p)
    if bias is not None:
        _check_bias_index(bias, win)
        check_sparse_bias(bias, q, k)
    mask = additive_mask(q, k, key_padding_mask, None, conventions)            # [B, 1, 1, K] or None
    name, _ = select_window_backend(q, backend)
    call = Call.of(q, scale, mask, dropout_p, _call_seed(dropout_p, dropout_seed))
    if name == "dense":
        return dense_window_attention(q, k, v, win, bias, call)
    if win.nnz == 0 or q.numel() == 0:  # every window empty, or nothing to attend: zeros (zero gradients)
        return zeros_like_output(q, k, v, None if bias is None else bias.values)
    values = None if bias is None else bias.values
    return window_op(q, k, v, values, win, call, name)
