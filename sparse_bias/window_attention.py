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

from typing import Optional, Tuple

import torch

from ._core.dispatch import choose_backend
from ._core.inputs import AttentionInputs
from ._core.masks import functional_masks
from ._core.ops import WindowAttention
from ._core.reference import dense_window_attention
from .backends import backend_names
from .bias import SparseBias
from .windows import WindowIndex

__all__ = ["window_attention", "select_window_backend", "attend_windows", "WINDOW_BACKENDS"]

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
    return attend_windows(AttentionInputs.of("window", q, k, v, bias, win, key_padding_mask=key_padding_mask,
                                             dropout_p=dropout_p, scale=scale, dropout_seed=dropout_seed,
                                             conventions=_WINDOW_MASKS), backend)


def attend_windows(inputs: AttentionInputs, backend: str = "auto") -> torch.Tensor:
    """``[B, H, Q, D]``: `window_attention` on a validated call (the `sparse_bias.nn` modules build theirs with
    their own mask conventions): the backend chosen, then the op's ``autograd.Function``."""
    name, _ = select_window_backend(inputs.q, backend)
    q, k, v, win, call, values = inputs.q, inputs.k, inputs.v, inputs.win, inputs.call, inputs.values
    if name == "dense":
        return dense_window_attention(q, k, v, win, inputs.bias, call)
    if inputs.empty:                # every window empty, or nothing to attend: zeros (zero gradients)
        return inputs.zeros()
    return WindowAttention.apply(q, k, v, values, win.entries().as_args(), call, name)
