"""Sparse bias values on a `WindowIndex`, and the per-query window weighting that makes them."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ._checks import check_device, check_finite, check_tensor, cuda_device, parse_to
from .windows import WindowIndex

__all__ = ["SparseBias", "ModalityBias", "window_bias"]

PROFILES = ("flat", "gaussian")


class SparseBias:
    """An additive attention bias that is zero outside each query's local windows.

    Args:
        index: the `WindowIndex` giving the ``nnz`` (query, key) entries.
        values: ``[nnz]`` (one value shared by all heads) or ``[nnz, H]`` (one per head), floating point.
            Gradients flow back through ``values`` (to the weights and scale that produced them).

    ``to_dense()`` materialises the origin design's tensor: ``[B, Q, K]`` or ``[B, H, Q, K]``.
    """

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

    @property
    def num_heads(self) -> Optional[int]:
        """``H`` for per-head values, None when the values are shared by all heads."""
        return self.values.shape[1] if self.values.dim() == 2 else None

    @property
    def shape(self) -> torch.Size:
        """Shape of `to_dense`: ``[B, Q, K]`` or ``[B, H, Q, K]``."""
        b, q, k = self.index.batch_size, self.index.num_queries, self.index.layout.num_keys
        return torch.Size((b, q, k) if self.num_heads is None else (b, self.num_heads, q, k))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, *args, **kwargs) -> "SparseBias":
        """Move / cast like a tensor: ``.to(device)``, ``.to(dtype)``, ``.to(device, dtype)``, ``.to(tensor)`` or
        keywords. The index moves with the values (integer, so a dtype applies to the values only); the cast is
        differentiable."""
        device, dtype = parse_to(*args, **kwargs)
        index = self.index.to(device) if device is not None else self.index
        return SparseBias(index, self.values.to(device=device, dtype=dtype))

    def cpu(self) -> "SparseBias":
        return self.to("cpu")

    def cuda(self, device=None) -> "SparseBias":
        return self.to(cuda_device(device))

    def detach(self) -> "SparseBias":
        """The same bias with its values detached from the graph."""
        return SparseBias(self.index, self.values.detach())

    def nbytes(self) -> int:
        """Bytes of the sparse structure: index tensors plus values."""
        return self.index.nbytes() + self.values.numel() * self.values.element_size()

    def to_dense(self, queries: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dense bias: ``[B, Q, K]`` (shared values) or ``[B, H, Q, K]`` (per-head), zeros outside the
        windows. Differentiable in ``values``. Memory: ``B * (H) * Q * K`` elements -- the reference.

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
            return dense.view(b, q, k)
        return dense.view(b, q, k, self.num_heads).permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        heads = "shared" if self.num_heads is None else f"H={self.num_heads}"
        return f"SparseBias(nnz={self.index.nnz}, {heads}, dtype={self.dtype}, dense_shape={list(self.shape)})"


class ModalityBias:
    """One additive bias per query and modality over *all* keys of that modality (global, not local).

    The origin design's ``use_local_bias=False``: every BEV key of query ``(b, q)`` gets
    ``values[b, q, 0]``, every camera key ``values[b, q, 1]`` (modalities in layout order, only those the
    layout has). `sparse_bias_attention` computes it exactly from one dense pass per modality and
    their log-sum-exps -- no ``[B, Q, K]`` tensor, no window index.

    Args:
        layout: the `KeyLayout`.
        values: ``[B, Q, M]`` (shared by heads) or ``[B, Q, M, H]`` (per head), ``M`` = modalities in the
            layout (2 for CMT fusion). Differentiable.
    """

    def __init__(self, layout, values: torch.Tensor):
        from .layout import KeyLayout
        if not isinstance(layout, KeyLayout):
            raise TypeError(f"layout must be a KeyLayout, got {type(layout).__name__}")
        check_tensor("values", values, ndim=(3, 4), floating=True)
        self.ranges = [r for r in ((0, layout.num_bev_keys), (layout.num_bev_keys, layout.num_keys)) if r[1] > r[0]]
        if values.shape[2] != len(self.ranges):
            raise ValueError(f"values must be [B, Q, M] or [B, Q, M, H] with M = {len(self.ranges)} modalities, "
                             f"got shape {tuple(values.shape)}")
        self.layout, self.values = layout, values

    @property
    def num_heads(self) -> Optional[int]:
        return self.values.shape[3] if self.values.dim() == 4 else None

    @property
    def shape(self) -> torch.Size:
        b, q = self.values.shape[:2]
        k = self.layout.num_keys
        return torch.Size((b, q, k) if self.num_heads is None else (b, self.num_heads, q, k))

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def to(self, *args, **kwargs) -> "ModalityBias":
        """Move / cast the values like a tensor (``.to(device)``, ``.to(dtype)``, ``.to(device, dtype)``, ...)."""
        device, dtype = parse_to(*args, **kwargs)
        return ModalityBias(self.layout, self.values.to(device=device, dtype=dtype))

    def cpu(self) -> "ModalityBias":
        return self.to("cpu")

    def cuda(self, device=None) -> "ModalityBias":
        return self.to(cuda_device(device))

    def detach(self) -> "ModalityBias":
        return ModalityBias(self.layout, self.values.detach())

    def to_dense(self) -> torch.Tensor:
        """``[B, Q, K]`` or ``[B, H, Q, K]`` (the reference)."""
        sizes = [e - s for s, e in self.ranges]
        vals = self.values if self.num_heads is None else self.values.permute(0, 3, 1, 2)   # [B, (H,) Q, M]
        return torch.repeat_interleave(vals, torch.tensor(sizes, device=vals.device), dim=-1,
                                       output_size=self.layout.num_keys)

    def __repr__(self) -> str:
        heads = "shared" if self.num_heads is None else f"H={self.num_heads}"
        return f"ModalityBias(M={len(self.ranges)}, {heads}, dtype={self.dtype}, dense_shape={list(self.shape)})"


def _check_weight(name: str, w, index: WindowIndex) -> torch.Tensor:
    check_tensor(name, w, ndim=(2, 3), floating=True)
    if tuple(w.shape[:2]) != (index.batch_size, index.num_queries):
        raise ValueError(f"{name} must be [B, Q] or [B, Q, H] with [B, Q] = "
                         f"[{index.batch_size}, {index.num_queries}], got shape {tuple(w.shape)}")
    check_device(name, w, index.device, "the window index")
    check_finite(name, w)
    return w


class _SegmentExpand(torch.autograd.Function):
    """``src.index_select(0, seg)`` for a non-decreasing ``seg`` (a CSR "expand": segment ``s`` is copied to
    entries ``offsets[s]:offsets[s + 1]``), whose backward is a deterministic CSR segment sum along dim 0
    (``torch.segment_reduce``; each segment summed in entry order by one thread) instead of the racy
    ``index_put(accumulate=True)`` of advanced indexing. No host sync forward or backward."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, seg: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(offsets)
        return src.index_select(0, seg)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        offsets, = ctx.saved_tensors
        out = torch.segment_reduce(grad.contiguous(), "sum", offsets=offsets, axis=0, unsafe=True, initial=0)
        return out, None, None


def _segment_expand(src: torch.Tensor, win: WindowIndex) -> torch.Tensor:
    """``[nnz, *tail]``: row ``row * 2 + source`` of ``src [B * Q * 2, *tail]`` for every entry of ``win``,
    with a deterministic backward (see `_SegmentExpand`)."""
    seg, offsets = win.modality_segments()
    return _SegmentExpand.apply(src, seg, offsets)


def _pair(name: str, x):
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} must be a number or a (bev, cam) pair, got {x!r}")
        return tuple(x)
    return (x, x)


def window_bias(win: WindowIndex, bev_weight: Optional[torch.Tensor] = None,
                cam_weight: Optional[torch.Tensor] = None, scale: Union[float, torch.Tensor] = 1.0,
                profile: str = "flat", sigma: Union[None, float, Sequence[float]] = None) -> SparseBias:
    """Spread each query's per-modality weight over its windows: ``bias = weight * scale * profile``.

    An entry of query ``(b, q)`` in its BEV window gets ``bev_weight[b, q] * scale * f(dy, dx)``, an entry
    in a camera window ``cam_weight[b, q] * scale * f(dy, dx)``, with ``f = 1`` for the ``"flat"`` profile
    (the origin design) and ``f = exp(-(dy^2 + dx^2) / (2 sigma^2))`` for ``"gaussian"``.

    Args:
        win: the `WindowIndex` from `local_windows`.
        bev_weight: ``[B, Q]`` (shared by heads) or ``[B, Q, H]`` (per head); required when ``win`` has
            BEV windows, ignored (may be None) otherwise.
        cam_weight: same for the camera windows.
        scale: a float, or a 0-d tensor (may require grad: a learnable scale).
        profile: ``"flat"`` or ``"gaussian"``.
        sigma: Gaussian width in cells: a float, a ``(bev, cam)`` pair, or None for half the window's
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
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
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
    dtype = torch.result_type(*weights.values()) if len(weights) == 2 else next(iter(weights.values())).dtype
    if isinstance(scale, torch.Tensor):
        check_tensor("scale", scale, floating=True)
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a 0-d tensor, got shape {tuple(scale.shape)}")
        check_device("scale", scale, win.device, "the window index")
        check_finite("scale", scale)
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

    if profile == "gaussian":
        sig_bev, sig_cam = _pair("sigma", sigma)
        # The falloff is computed in at least fp32: squared offsets of large windows overflow fp16.
        fdtype = torch.promote_types(dtype, torch.float32)
        if sigma is None:
            sig = win.half_size().clamp(min=1).to(fdtype) / 2
        else:
            for s in (sig_bev, sig_cam):
                if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
                    raise ValueError(f"sigma must be a positive number or a (bev, cam) pair, got {sigma!r}")
            sig = torch.tensor([sig_bev, sig_cam], dtype=fdtype, device=win.device)[win.source.long()]
        d2 = win.dy.to(fdtype) ** 2 + win.dx.to(fdtype) ** 2
        falloff = torch.exp(-d2 / (2 * sig * sig)).to(dtype)
        values = values * (falloff.unsqueeze(-1) if tail else falloff)
    return SparseBias(win, values * scale)
