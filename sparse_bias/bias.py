"""Sparse bias values on a `WindowIndex`, and the per-query window weighting that makes them."""
from __future__ import annotations

import abc
import copy
from typing import Optional, Sequence, TypeVar, Union

import torch

from ._core.checks import check_device, check_tensor, cuda_device, debug_check_finite, parse_to
from ._core.compat import is_compiling
from .layout import KeyLayout
from .profiles import PROFILES, flat, get_profile, sigma_pair  # noqa: F401  (PROFILES: the old `bias.PROFILES`)
from .windows import WindowIndex, _mark_dynamic

__all__ = ["SparseBias", "ModalityBias", "window_bias"]


_T = TypeVar("_T", bound="_ValuesLike")


class _ValuesLike(abc.ABC):
    """The tensor-like part shared by the biases: everything follows ``values``, whose dim ``_HEAD_DIM`` (when
    present) holds the heads. A subclass says how to rebuild itself around new values (`_with_values`)."""

    _HEAD_DIM: int
    values: torch.Tensor

    @abc.abstractmethod
    def _with_values(self: _T, values: torch.Tensor, device: Optional[torch.device]) -> _T:
        """The same bias with ``values`` (already moved / cast); ``device``, when not None, is where they moved, so
        that a structure living on a device can follow."""

    @abc.abstractmethod
    def _describe(self) -> str:
        """What `__repr__` shows first (``nnz=...``, ``M=...``)."""

    @property
    def num_heads(self) -> Optional[int]:
        """``H`` for per-head values, None when the values are shared by all heads."""
        return self.values.shape[self._HEAD_DIM] if self.values.dim() == self._HEAD_DIM + 1 else None

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self: _T, *args, **kwargs) -> _T:
        """Move / cast like a tensor: ``.to(device)``, ``.to(dtype)``, ``.to(device, dtype)``, ``.to(tensor)`` or
        keywords. A dtype applies to the values only (a `SparseBias`'s window index is integer and moves with the
        values); the cast is differentiable."""
        device, dtype = parse_to(*args, **kwargs)
        return self._keep_layout(self._with_values(self.values.to(device=device, dtype=dtype), device))

    def cpu(self: _T) -> _T:
        return self.to("cpu")

    def cuda(self: _T, device=None) -> _T:
        return self.to(cuda_device(device))

    def detach(self: _T) -> _T:
        """The same bias with its values detached from the graph."""
        return self._keep_layout(self._with_values(self.values.detach(), None))

    def _leave_inference_mode(self) -> None:
        """Swap values made under ``torch.inference_mode()`` for a normal copy when used outside it (autograd cannot
        save inference tensors for backward); the attention ops call it at every call, a no-op after the first."""
        if not is_compiling() and self.values.is_inference() and not torch.is_inference_mode_enabled():
            self.values = self.values.clone()

    def _keep_layout(self: _T, other: _T) -> _T:
        if self._seq_first:
            other._seq_first = True
        other.debug = self.debug
        return other

    #: True for the sequence-first view that `transpose` returns
    _seq_first = False

    #: Set True (the generators do with ``debug_mode=True``, the dense version's option) to have
    #: `sparse_bias.nn.SparseBiasMultiheadAttention` compare its output with the dense reference on a sample of
    #: queries (a warning past the tolerance) and log the bias statistics. Kept by `to`, `detach` and `transpose`.
    debug = False

    @property
    def seq_first(self) -> bool:
        """True for the sequence-first view (``bias.transpose(0, 1)``): ``shape`` and ``to_dense()`` have dims 0
        and 1 swapped (``[Q, B, K]``)."""
        return self._seq_first

    def transpose(self: _T, dim0: int, dim1: int) -> _T:
        """Swap dims 0 and 1, as ``dense.transpose(0, 1)`` does: the sequence-first view of the bias.

        CMTTEST's ``CmtTransformer.forward`` turns its dense ``attention_bias`` ``[B, Q, K]`` into the attention's
        sequence-first layout ``[Q, B, K]`` with ``attention_bias.transpose(0, 1)``; the same call on this bias
        returns a view that shares the index and the values (no copy) and is flagged sequence-first:
        ``view.shape`` is ``[Q, B, K]`` (``[H, B, Q, K]`` for per-head values ``[B, H, Q, K]``, as torch
        transposes them), ``view.to_dense()`` equals ``bias.to_dense().transpose(0, 1)``, gradients flow to the
        same values. Transposing the view again gives the batch-first bias back. `sparse_bias.nn`'s modules take
        the view wherever they take a dense bias in the sequence-first layout (and a plain bias everywhere).

        Args:
            dim0: ``0`` or ``1`` (or the same dim counted from the end).
            dim1: the other of the two.

        Raises:
            ValueError: any other pair of dims (the bias has no other layout).
        """
        ndim = len(self.shape)
        dims = sorted(d + ndim if isinstance(d, int) and -ndim <= d < 0 else d for d in (dim0, dim1))
        if dims != [0, 1]:
            raise ValueError(f"{type(self).__name__}.transpose({dim0}, {dim1}): only dims 0 and 1 (batch and "
                             f"queries of the dense {list(self.shape)}) can be swapped: transpose(0, 1) gives the "
                             "sequence-first view, and again the batch-first bias")
        view = copy.copy(self)
        view._seq_first = not self._seq_first
        return view

    def _layout(self, dense_or_shape):
        """``shape`` / ``to_dense()`` in this bias's layout: dims 0 and 1 swapped for the sequence-first view."""
        if not self._seq_first:
            return dense_or_shape
        if isinstance(dense_or_shape, torch.Size):
            return torch.Size((dense_or_shape[1], dense_or_shape[0]) + tuple(dense_or_shape[2:]))
        return dense_or_shape.transpose(0, 1)

    def __repr__(self) -> str:
        heads = "shared" if self.num_heads is None else f"H={self.num_heads}"
        view = ", seq_first" if self._seq_first else ""
        return (f"{type(self).__name__}({self._describe()}, {heads}, dtype={self.dtype}, "
                f"dense_shape={list(self.shape)}{view})")


class SparseBias(_ValuesLike):
    """An additive attention bias that is zero outside each query's local windows.

    Args:
        index: the `WindowIndex` giving the ``nnz`` (query, key) entries.
        values: ``[nnz]`` (one value shared by all heads) or ``[nnz, H]`` (one per head), floating point.
            Gradients flow back through ``values`` (to the weights and scale that produced them).

    ``to_dense()`` materialises the dense version's tensor: ``[B, Q, K]`` or ``[B, H, Q, K]``. Tensor-like:
    ``dtype``, ``device``, ``num_heads``, ``to`` / ``cpu`` / ``cuda`` (the index moves with the values),
    ``detach``, ``transpose(0, 1)`` (the sequence-first view ``[Q, B, K]``, no copy; see `transpose`).

    A bias made under ``torch.inference_mode()`` (index and values) can be used outside it, in training too: the
    attention ops swap its inference tensors for normal copies at the first such call.
    """

    _HEAD_DIM = 1

    def __init__(self, index: WindowIndex, values: torch.Tensor):
        if not isinstance(index, WindowIndex):
            raise TypeError(f"index must be a WindowIndex, got {type(index).__name__}")
        check_tensor("values", values, ndim=(1, 2), floating=True)
        if values.shape[0] != index.nnz:
            raise ValueError(f"values must be [nnz] or [nnz, H] with nnz = {index.nnz}, "
                             f"got shape {tuple(values.shape)}")
        check_device("values", values, index.device, "index")
        self.index = index
        self.values = values
        _mark_dynamic(values)        # under torch.compile, biases of every nnz share a graph, as their indexes do

    def _with_values(self, values: torch.Tensor, device: Optional[torch.device]) -> "SparseBias":
        return SparseBias(self.index.to(device) if device is not None else self.index, values)

    def _describe(self) -> str:
        return f"nnz={self.index.nnz}"

    @property
    def shape(self) -> torch.Size:
        """Shape of `to_dense`: ``[B, Q, K]`` or ``[B, H, Q, K]``."""
        b, q, k = self.index.batch_size, self.index.num_queries, self.index.layout.num_keys
        return self._layout(torch.Size((b, q, k) if self.num_heads is None else (b, self.num_heads, q, k)))

    def nbytes(self) -> int:
        """Bytes of the sparse structure: index tensors plus values."""
        return self.index.nbytes() + self.values.numel() * self.values.element_size()

    def to_dense(self, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dense bias: ``[B, Q, K]`` (shared values) or ``[B, H, Q, K]`` (per-head), zeros outside the
        windows (dims 0 and 1 swapped for the sequence-first view, see `transpose`). Differentiable in
        ``values``. Memory: ``B * (H) * Q * K`` elements -- the reference.

        Args:
            queries: optional LongTensor ``[R]`` of distinct query indices: only those rows, giving
                ``[B, R, K]`` / ``[B, H, R, K]`` (e.g. to check a sample of queries).
        """
        idx = self.index
        b, q, k = idx.batch_size, idx.num_queries, idx.layout.num_keys
        rows, values = idx.row, self.values
        if queries is not None:
            queries = torch.as_tensor(queries, device=idx.device).long()
            order = torch.argsort(queries)
            local_q = rows % max(q, 1)
            pos = torch.searchsorted(queries[order], local_q).clamp(max=max(queries.numel() - 1, 0))
            keep = (queries[order][pos] == local_q) if queries.numel() else torch.zeros_like(rows, dtype=torch.bool)
            sel = keep.nonzero().flatten()
            rows = torch.div(rows[sel], max(q, 1), rounding_mode="floor") * queries.numel() + order[pos[sel]]
            values, q = values[sel], queries.numel()
            flat = rows * k + idx.key[sel]
        else:
            flat = rows * k + idx.key
        tail = values.shape[1:]
        dense = values.new_zeros((b * q * k,) + tuple(tail)).index_put((flat,), values)
        if self.num_heads is None:
            return self._layout(dense.view(b, q, k))
        return self._layout(dense.view(b, q, k, self.num_heads).permute(0, 3, 1, 2).contiguous())


class ModalityBias(_ValuesLike):
    """One additive bias per query and modality over *all* keys of that modality (global, not local).

    The dense version's ``use_local_bias=False``: every BEV key of query ``(b, q)`` gets
    ``values[b, q, 0]``, every camera key ``values[b, q, 1]`` (modalities in layout order, only those the
    layout has). `sparse_bias_attention` computes it exactly from one dense pass per modality and
    their log-sum-exps -- no ``[B, Q, K]`` tensor, no window index.

    Args:
        layout: the `KeyLayout`.
        values: ``[B, Q, M]`` (shared by heads) or ``[B, Q, M, H]`` (per head), ``M`` = modalities in the
            layout (2 for CMT fusion). Differentiable.

    ``to_dense()`` gives ``[B, Q, K]`` or ``[B, H, Q, K]``. Tensor-like as `SparseBias` (``dtype``, ``device``,
    ``num_heads``, ``to`` / ``cpu`` / ``cuda``, ``detach``); the layout holds no tensor and stays as it is.
    """

    _HEAD_DIM = 3

    def __init__(self, layout: KeyLayout, values: torch.Tensor):
        if not isinstance(layout, KeyLayout):
            raise TypeError(f"layout must be a KeyLayout, got {type(layout).__name__}")
        check_tensor("values", values, ndim=(3, 4), floating=True)
        self.ranges = [r for r in ((0, layout.num_bev_keys), (layout.num_bev_keys, layout.num_keys)) if r[1] > r[0]]
        if values.shape[2] != len(self.ranges):
            raise ValueError(f"values must be [B, Q, M] or [B, Q, M, H] with M = {len(self.ranges)} modalities, "
                             f"got shape {tuple(values.shape)}")
        self.layout, self.values = layout, values

    def _with_values(self, values: torch.Tensor, device: Optional[torch.device]) -> "ModalityBias":
        return ModalityBias(self.layout, values)

    def _describe(self) -> str:
        return f"M={len(self.ranges)}"

    @property
    def shape(self) -> torch.Size:
        """Shape of `to_dense`: ``[B, Q, K]`` or ``[B, H, Q, K]``."""
        b, q = self.values.shape[:2]
        k = self.layout.num_keys
        return self._layout(torch.Size((b, q, k) if self.num_heads is None else (b, self.num_heads, q, k)))

    def to_dense(self) -> torch.Tensor:
        """``[B, Q, K]`` or ``[B, H, Q, K]`` (the reference), in the values' dtype; a half-precision gradient is
        summed over each modality's keys in float32 (torch 2.0 sums ``repeat_interleave``'s in half)."""
        sizes = [e - s for s, e in self.ranges]
        vals = self.values if self.num_heads is None else self.values.permute(0, 3, 1, 2)   # [B, (H,) Q, M]
        half = vals.dtype in (torch.float16, torch.bfloat16)
        dense = torch.repeat_interleave(vals.float() if half else vals, torch.tensor(sizes, device=vals.device),
                                        dim=-1, output_size=self.layout.num_keys)
        return self._layout(dense.to(vals.dtype))


def _check_weight(name: str, w, index: WindowIndex) -> torch.Tensor:
    check_tensor(name, w, ndim=(2, 3), floating=True)
    if tuple(w.shape[:2]) != (index.batch_size, index.num_queries):
        raise ValueError(f"{name} must be [B, Q] or [B, Q, H] with [B, Q] = "
                         f"[{index.batch_size}, {index.num_queries}], got shape {tuple(w.shape)}")
    check_device(name, w, index.device, "the window index")
    debug_check_finite(name, w)
    return w


class _SegmentExpand(torch.autograd.Function):
    """``src.index_select(0, seg)`` for a non-decreasing ``seg`` (a CSR "expand": segment ``s`` is copied to
    entries ``offsets[s]:offsets[s + 1]``), whose backward is a deterministic CSR segment sum along dim 0
    (``torch.segment_reduce``; each segment summed in entry order by one thread, half precision in float32)
    instead of the racy ``index_put(accumulate=True)`` of advanced indexing. No host sync forward or backward."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, seg: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(offsets)
        return src.index_select(0, seg)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        offsets, = ctx.saved_tensors
        if grad.numel() == 0:      # no entries (some torch releases refuse segment_reduce on empty data)
            return grad.new_zeros((offsets.shape[0] - 1,) + grad.shape[1:]), None, None
        acc = grad.float() if grad.dtype in (torch.float16, torch.bfloat16) else grad.contiguous()
        out = torch.segment_reduce(acc, "sum", offsets=offsets, axis=0, unsafe=True, initial=0)   # half: summed
        return out.to(grad.dtype), None, None                                # in float32 on every torch


def _segment_expand(src: torch.Tensor, win: WindowIndex) -> torch.Tensor:
    """``[nnz, *tail]``: row ``row * 2 + source`` of ``src [B * Q * 2, *tail]`` for every entry of ``win``,
    with a deterministic backward (see `_SegmentExpand`)."""
    seg, offsets = win.modality_segments()
    return _SegmentExpand.apply(src, seg, offsets)


def window_bias(win: WindowIndex, bev_weight: Optional[torch.Tensor] = None,
                cam_weight: Optional[torch.Tensor] = None, scale: Union[float, torch.Tensor] = 1.0,
                profile: str = "flat", sigma: Union[None, float, Sequence[float]] = None) -> SparseBias:
    """Spread each query's per-modality weight over its windows: ``bias = weight * scale * profile``.

    An entry of query ``(b, q)`` in its BEV window gets ``bev_weight[b, q] * scale * f(dy, dx)``, an entry
    in a camera window ``cam_weight[b, q] * scale * f(dy, dx)``, with ``f`` the profile registered in
    `sparse_bias.profiles.PROFILES`: ``f = 1`` for ``"flat"`` (the dense version) and
    ``f = exp(-(dy^2 + dx^2) / (2 sigma^2))`` for ``"gaussian"``.

    Args:
        win: the `WindowIndex` from `local_windows`.
        bev_weight: ``[B, Q]`` (shared by heads) or ``[B, Q, H]`` (per head); required when ``win`` has
            BEV windows, ignored (may be None) otherwise.
        cam_weight: same for the camera windows.
        scale: a float, or a 0-d tensor (may require grad: a learnable scale).
        profile: a name in `sparse_bias.profiles.PROFILES`: ``"flat"`` or ``"gaussian"``.
        sigma: the profile's width in cells (Gaussian: sigma; unused by ``"flat"``): a float, a ``(bev, cam)`` pair, or None for half the window's
            half-size (``max(w // 2, 1) / 2``, per entry, so adaptive windows scale along).

    Returns:
        `SparseBias` with values ``[nnz]`` (both weights ``[B, Q]``) or ``[nnz, H]``, in the
        weights' dtype; differentiable in the weights and ``scale``.

    Example:

        >>> import torch, sparse_bias as sb
        >>> layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100))
        >>> win = sb.local_windows(layout, torch.tensor([[[90, 90]]]), torch.tensor([[[0, 20, 50]]]))
        >>> bias = sb.window_bias(win, torch.tensor([[0.5]]), torch.tensor([[1.0]]), scale=2.0)
        >>> bias.to_dense().shape, bias.values.unique().tolist()
        (torch.Size([1, 1, 56400]), [1.0, 2.0])
    """
    if not isinstance(win, WindowIndex):
        raise TypeError(f"win must be a WindowIndex, got {type(win).__name__}")
    win.validate()            # once per index object (free for local_windows' indexes); the gather relies on it
    falloff_of = get_profile(profile)
    has = {"bev_weight": win.bev_pos is not None, "cam_weight": win.cam_pos is not None}
    weights = {}
    for name, w in (("bev_weight", bev_weight), ("cam_weight", cam_weight)):
        if w is None:
            if has[name]:
                raise ValueError(f"{name} is required: the window index has "
                                 f"{'BEV' if name == 'bev_weight' else 'camera'} windows")
            continue
        weights[name] = _check_weight(name, w, win)
    heads = {w.shape[2] for w in weights.values() if w.dim() == 3}
    if len(heads) > 1:
        raise ValueError(f"bev_weight and cam_weight disagree on the number of heads: {sorted(heads)}")
    dtypes = [w.dtype for w in weights.values()]
    dtype = torch.promote_types(*dtypes) if len(dtypes) == 2 else dtypes[0]
    if isinstance(scale, torch.Tensor):
        check_tensor("scale", scale, floating=True)
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a 0-d tensor, got shape {tuple(scale.shape)}")
        check_device("scale", scale, win.device, "the window index")
        debug_check_finite("scale", scale)
        scale = scale.reshape(())
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
        raise ValueError(f"scale must be a finite number or a 0-d tensor, got {scale!r}")

    # One gather: stack (bev, cam) weights per query and pick by (row, source). ``row * 2 + source`` never
    # decreases over the entries, so the gather is a CSR expand whose backward is a deterministic segment sum.
    tail = (heads.pop(),) if heads else ()
    b, q = win.batch_size, win.num_queries
    stacked = []
    for name in ("bev_weight", "cam_weight"):
        w = weights.get(name)
        w = torch.zeros((b, q) + tail, dtype=dtype, device=win.device) if w is None else w.to(dtype)
        stacked.append(w.unsqueeze(-1).expand((b, q) + tail) if tail and w.dim() == 2 else w)
    stacked = torch.stack(stacked, dim=2)                              # [B, Q, 2, (H)]
    values = _segment_expand(stacked.reshape((b * q * 2,) + tail), win)

    if falloff_of is not flat:                  # flat: f = 1 reads neither the offsets nor sigma, nothing to multiply
        pair = sigma_pair(sigma)
        # The falloff is computed in at least fp32: squared offsets of large windows overflow fp16.
        fdtype = torch.promote_types(dtype, torch.float32)
        if pair is None:
            sig = win.half_size().clamp(min=1).to(fdtype) / 2
        else:
            sig = torch.tensor(pair, dtype=fdtype, device=win.device)[win.source.long()]
        falloff = falloff_of(win.dy.to(fdtype), win.dx.to(fdtype), sig).to(dtype)
        values = values * (falloff.unsqueeze(-1) if tail else falloff)
    return SparseBias(win, values * scale)
