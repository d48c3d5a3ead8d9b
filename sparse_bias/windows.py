"""Per-query local windows on the BEV grid and the camera views, as a CSR index set over queries."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Union

import torch

from ._core.compat import is_compiling, is_exporting, not_traced
from ._core.checks import check_device, check_tensor, check_window_size, cuda_device, parse_to
from ._core.entries import Entries, build_entries, entry_rows
from .layout import KeyLayout

__all__ = ["WindowIndex", "local_windows"]

WindowSize = Union[int, torch.Tensor]

SOURCE_BEV = 0
SOURCE_CAM = 1


@dataclass(eq=False)
class WindowIndex:
    """The keys inside every query's local windows, in CSR form over queries (batch-major).

    Entry ``e`` in ``indptr[b * Q + q] : indptr[b * Q + q + 1]`` says that query ``q`` of batch ``b``
    has key ``key[e]`` in one of its windows. Inside each query the keys ascend and are unique:
    the BEV window first, then the camera windows in view order.

    Attributes:
        layout: the `KeyLayout` the keys index into.
        batch_size, num_queries: ``B`` and ``Q``.
        indptr: LongTensor ``[B * Q + 1]``.
        key: LongTensor ``[nnz]``, index into the layout's keys.
        source: int8 ``[nnz]``, 0 = BEV window, 1 = camera window.
        dy, dx: int32 ``[nnz]``, offset of the cell from the window centre (row, column); int32 so that
            any window on any grid fits (int16 wrapped beyond +-32767 cells).
        bev_pos: LongTensor ``[B, Q, 2]`` the windows were centred on, or None.
        cam_pos: LongTensor ``[B, Q, M, 3]`` the windows were centred on (views sorted), or None.
        bev_window, cam_window: the window sizes it was built for (odd int, or LongTensor ``[B, Q]``).

    Validation (what is checked when):

    * **At construction** (``__post_init__``, metadata only, never reads device values, no host sync):
      ``layout`` is a `KeyLayout`; ``batch_size`` / ``num_queries`` are non-negative ints; ``indptr`` and
      ``key`` are 1-D int64 tensors (int32 is a TypeError: use ``.long()``); ``indptr`` has ``B * Q + 1``
      elements; ``source``, ``dy``, ``dx`` are 1-D integer tensors as long as ``key``; every tensor is on
      one device. Errors name the argument.
    * **Once per index object**, by `validate` (reads device values, one or two host syncs):
      ``indptr[0] == 0``, ``indptr`` non-decreasing, ``indptr[-1] == nnz``; keys in ``[0, layout.num_keys)``;
      keys strictly ascending (so unique) within each query; ``source`` in ``{0, 1}`` and matching the
      key's modality (0 for BEV keys, 1 for camera keys). A `ValueError` names ``indptr`` / ``key`` /
      ``source``, the bad value and its position. The result is cached on the object: later calls return at
      once without touching tensor values (the attention ops call it at every call), and `to` copies keep it.
      Indexes built by `local_windows` are valid by construction and come out already validated. An index
      changed in place after validation is not checked again.

    An index built under ``torch.inference_mode()`` (or whose cached structures were first derived there) is
    usable outside it, in training too: the first call outside inference mode swaps its tensors for normal copies
    (``clone``, once per index object, no host sync); inference tensors cannot be saved for backward.
    """

    layout: KeyLayout
    batch_size: int
    num_queries: int
    indptr: torch.Tensor
    key: torch.Tensor
    source: torch.Tensor
    dy: torch.Tensor
    dx: torch.Tensor
    bev_pos: Optional[torch.Tensor] = None
    cam_pos: Optional[torch.Tensor] = None
    bev_window: WindowSize = 0
    cam_window: WindowSize = 0
    _cache: Dict[str, object] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.layout, KeyLayout):
            raise TypeError(f"layout must be a KeyLayout, got {type(self.layout).__name__}")
        for name in ("batch_size", "num_queries"):
            n = getattr(self, name)
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"{name} must be an int, got {type(n).__name__}")
            if n < 0:
                raise ValueError(f"{name} must be >= 0, got {n}")
        for name in ("indptr", "key"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != torch.int64:
                raise TypeError(f"{name} must be an int64 (torch.long) tensor, got dtype {t.dtype}; "
                                f"use {name}.long()")
            if t.dim() != 1:
                raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
        if self.indptr.numel() != self.num_rows + 1:
            raise ValueError(f"indptr must have B * Q + 1 = {self.num_rows + 1} elements (B = {self.batch_size}, "
                             f"Q = {self.num_queries}), got {self.indptr.numel()}")
        for name in ("source", "dy", "dx"):
            t = getattr(self, name)
            check_tensor(name, t, ndim=(1,), integer=True)
            if t.numel() != self.key.numel():
                raise ValueError(f"{name} must have one element per key entry (nnz = {self.key.numel()}), "
                                 f"got {t.numel()}")
        device = self.key.device
        check_device("indptr", self.indptr, device, "key")
        for name in ("source", "dy", "dx", "bev_pos", "cam_pos", "bev_window", "cam_window"):
            t = getattr(self, name)
            if isinstance(t, torch.Tensor):
                check_device(name, t, device, "key")
        for name in ("bev_window", "cam_window"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, (int, torch.Tensor)):
                raise TypeError(f"{name} must be an int or a LongTensor [B, Q], got {type(size).__name__}")
        if not (is_compiling() or is_exporting()) and any(t.is_inference() for t in self._tensors().values()):
            self._cache["inference"] = True

    _TENSOR_FIELDS = ("indptr", "key", "source", "dy", "dx", "bev_pos", "cam_pos", "bev_window", "cam_window")

    def _tensors(self) -> Dict[str, torch.Tensor]:
        """The tensor fields, by name."""
        return {name: t for name, t in ((n, getattr(self, n)) for n in self._TENSOR_FIELDS)
                if isinstance(t, torch.Tensor)}

    def _cached(self, name: str, value):
        """Cache a derived structure; one derived under ``torch.inference_mode()`` holds inference tensors, noted
        so that the index leaves inference mode before it is used outside (`validate`)."""
        if not is_compiling() and torch.is_inference_mode_enabled():
            self._cache["inference"] = True
        self._cache[name] = value
        return value

    def _leave_inference_mode(self) -> None:
        """Swap the inference tensors (built under ``torch.inference_mode()``) for normal copies, and derive the
        cached structures again: autograd cannot save inference tensors for backward. Once per index object."""
        for name, t in self._tensors().items():
            if t.is_inference():
                setattr(self, name, t.clone())
        for name in ("row", "entries", "modality_segments"):
            self._cache.pop(name, None)
        self._cache.pop("inference", None)
        self.entries()

    def validate(self) -> "WindowIndex":
        """Check the index's device values once per object; returns ``self``.

        Checks ``indptr[0] == 0``, ``indptr`` non-decreasing, ``indptr[-1] == nnz``, keys in
        ``[0, layout.num_keys)`` and strictly ascending (unique) within each query, ``source`` in ``{0, 1}``
        and matching each key's modality. Raises a `ValueError` naming the tensor, the bad value and its
        position. The first call costs two host syncs; the result is cached in the object, so later calls
        return immediately without reading any tensor (no device work, no sync).
        """
        if self._cache.get("inference") and not is_compiling() and not torch.is_inference_mode_enabled():
            self._leave_inference_mode()
        if self._cache.get("validated"):
            return self
        if is_exporting():        # an exported program cannot read values: it trusts its index
            self.entries()
            return self
        _check_values(self)
        self.entries()
        self._cache["validated"] = True
        return self

    def modality_segments(self):
        """``(seg [nnz], offsets [B * Q * 2 + 1])``: entry ``e`` belongs to segment ``seg[e] = row * 2 + source``
        (the BEV window, then the camera windows, of each query); ``offsets`` are the CSR pointers of those
        ``B * Q * 2`` segments (``seg`` is non-decreasing on a valid index). Computed once (no Python loop,
        no host sync), then cached; used for the deterministic gradient of the per-query weights."""
        if "modality_segments" not in self._cache:
            seg = self.row * 2 + self.source.long()
            _mark_dynamic(seg)
            bounds = torch.arange(self.num_rows * 2 + 1, device=self.device)
            self._cached("modality_segments", (seg, torch.searchsorted(seg, bounds)))
        return self._cache["modality_segments"]

    @property
    def nnz(self) -> int:
        """Number of (query, key) entries over the whole batch."""
        return self.key.numel()

    @property
    def device(self) -> torch.device:
        return self.key.device

    @property
    def num_rows(self) -> int:
        """``B * Q``: the number of CSR rows."""
        return self.batch_size * self.num_queries

    @property
    def row(self) -> torch.Tensor:
        """LongTensor ``[nnz]``: the CSR row (``b * Q + q``) of every entry. Computed once, then cached."""
        if "row" not in self._cache:
            self._cached("row", entry_rows(self.indptr, self.nnz))
        return self._cache["row"]

    def batch_range(self, b: int):
        """``(e0, e1)``: the entries of batch element ``b`` (reads two device values: a host sync on a GPU; the
        attention ops never call it)."""
        nq = self.num_queries
        return int(self.indptr[b * nq]), int(self.indptr[(b + 1) * nq])

    def entries(self) -> Entries:
        """The `sparse_bias._core.entries.Entries` the kernels read (the row of each entry, the transposed structure,
        the fused kernels' row order), derived without a host sync, then cached on the object. When ``torch.compile``
        is in use (dynamo imported), their ``nnz`` dimension is marked dynamic (`torch._dynamo.maybe_mark_dynamic`),
        so indexes of different sizes share one compiled graph (an index built before dynamo was imported costs one
        recompile, after which the size is dynamic anyway)."""
        if "entries" not in self._cache:
            ent = build_entries(self.indptr, self.key, self.batch_size, self.num_queries, self.layout.num_keys,
                                self.row)
            _mark_dynamic(ent.key, ent.row, ent.trow, ent.perm, self.key, self.source, self.dy, self.dx)
            self._cached("entries", ent)
        return self._cache["entries"]

    def counts(self) -> torch.Tensor:
        """LongTensor ``[B, Q]``: window entries per query."""
        return (self.indptr[1:] - self.indptr[:-1]).view(self.batch_size, self.num_queries)

    def half_size(self) -> torch.Tensor:
        """LongTensor ``[nnz]``: half the size (``size // 2``) of the window each entry belongs to."""
        out = []
        for size in (self.bev_window, self.cam_window):
            if isinstance(size, torch.Tensor):
                out.append(size.reshape(-1)[self.row] // 2)
            else:
                out.append(torch.full((self.nnz,), size // 2, dtype=torch.long, device=self.device))
        return torch.where(self.source == SOURCE_BEV, out[0], out[1])

    def to_dense_mask(self) -> torch.Tensor:
        """BoolTensor ``[B, Q, K]``: True where a key is inside a query's windows (for tests and plots)."""
        mask = torch.zeros(self.num_rows * self.layout.num_keys, dtype=torch.bool, device=self.device)
        mask[self.row * self.layout.num_keys + self.key] = True
        return mask.view(self.batch_size, self.num_queries, self.layout.num_keys)

    def to(self, *args, **kwargs) -> "WindowIndex":
        """The index on another device, called like ``Tensor.to`` (``.to(device)``, ``.to(tensor)``, keywords).
        A dtype is accepted and ignored (index tensors are integer). Returns ``self`` when the device does not
        change (keeping the cached structures), else a copy (the cached structures are not carried over; the
        validated flag is, as the values are the same)."""
        device, _ = parse_to(*args, **kwargs)
        if device is None or device == self.device:
            return self

        def mv(x):
            return x.to(device) if isinstance(x, torch.Tensor) else x
        out = WindowIndex(self.layout, self.batch_size, self.num_queries, mv(self.indptr), mv(self.key),
                          mv(self.source), mv(self.dy), mv(self.dx), mv(self.bev_pos), mv(self.cam_pos),
                          mv(self.bev_window), mv(self.cam_window))
        if self._cache.get("validated"):
            out._cache["validated"] = True
        return out

    def cpu(self) -> "WindowIndex":
        return self.to("cpu")

    def cuda(self, device=None) -> "WindowIndex":
        return self.to(cuda_device(device))

    def detach(self) -> "WindowIndex":
        """``self``: an index carries no gradients (for symmetry with tensors and `SparseBias`)."""
        return self

    def nbytes(self) -> int:
        """Bytes held by the index tensors (``indptr``, ``key``, ``source``, ``dy``, ``dx``)."""
        return sum(t.numel() * t.element_size() for t in (self.indptr, self.key, self.source, self.dy, self.dx))

    def __repr__(self) -> str:
        return (f"WindowIndex(B={self.batch_size}, Q={self.num_queries}, nnz={self.nnz}, "
                f"bev_window={_size_repr(self.bev_window)}, cam_window={_size_repr(self.cam_window)}, "
                f"layout={self.layout!r})")


def _mark_dynamic(*tensors: torch.Tensor) -> None:
    """Mark the ``nnz`` dimension of an index's cached tensors dynamic for ``torch.compile``, so that indexes of
    other sizes reuse a compiled graph -- only when dynamo is already imported (never import it here)."""
    mark = getattr(sys.modules.get("torch._dynamo"), "maybe_mark_dynamic", None)    # torch 2.1+
    if mark is not None and not is_compiling():
        for t in tensors:
            mark(t, 0)


@not_traced("sparse_bias: WindowIndex.validate reads the index's values (once per index object), so it runs "
            "outside torch.compile's graph; with fullgraph=True, validate the index (index.validate(), or build it "
            "with local_windows) before the compiled region and pass it in")
def _check_values(index: WindowIndex) -> None:
    """The value checks of `WindowIndex.validate` (two host syncs); raises a `ValueError` naming the bad tensor."""
    nnz, indptr = index.nnz, index.indptr
    # Phase 1: the CSR pointers (one sync); the rows of phase 2 are only meaningful once they hold.
    flags = torch.stack([indptr[0] != 0, (indptr[1:] < indptr[:-1]).any(), indptr[-1] != nnz]).tolist()
    if flags[0]:
        raise ValueError(f"indptr[0] must be 0, got {int(indptr[0])}")
    if flags[1]:
        i = int((indptr[1:] < indptr[:-1]).nonzero()[0, 0])
        raise ValueError(f"indptr must be non-decreasing, got indptr[{i}] = {int(indptr[i])} > "
                         f"indptr[{i + 1}] = {int(indptr[i + 1])}")
    if flags[2]:
        raise ValueError(f"indptr[-1] must equal nnz = key.numel() = {nnz}, got {int(indptr[-1])}")
    if nnz:
        # Phase 2: keys and sources (one sync).
        key, src, nk = index.key, index.source.long(), index.layout.num_keys
        row = index.row
        key_bad = (key < 0) | (key >= nk)
        order_bad = (row[1:] == row[:-1]) & (key[1:] <= key[:-1])
        src_bad = (src != SOURCE_BEV) & (src != SOURCE_CAM)
        modality_bad = src != (key >= index.layout.num_bev_keys).long()
        flags = torch.stack([key_bad.any(), order_bad.any(), src_bad.any(), modality_bad.any()]).tolist()
        nq = max(index.num_queries, 1)

        def query(e):
            r = int(row[e])
            return f"({r // nq}, {r % nq})"
        if flags[0]:
            e = int(key_bad.nonzero()[0, 0])
            raise ValueError(f"key[{e}] = {int(key[e])} (query {query(e)}) is out of range [0, {nk}) "
                             f"of the layout")
        if flags[1]:
            e = int(order_bad.nonzero()[0, 0])
            k0, k1 = int(key[e]), int(key[e + 1])
            what = f"repeats key {k1}" if k0 == k1 else f"has key {k1} after key {k0}"
            raise ValueError(f"key must ascend and be unique within each query; query {query(e)} {what} "
                             f"(entries {e} and {e + 1})")
        if flags[2]:
            e = int(src_bad.nonzero()[0, 0])
            raise ValueError(f"source must be 0 (BEV) or 1 (camera), got source[{e}] = {int(src[e])}")
        if flags[3]:
            e = int(modality_bad.nonzero()[0, 0])
            kind = "camera" if int(key[e]) >= index.layout.num_bev_keys else "BEV"
            raise ValueError(f"source[{e}] = {int(src[e])} but key[{e}] = {int(key[e])} is a {kind} key "
                             f"(BEV keys are [0, {index.layout.num_bev_keys}))")


def _size_repr(size: WindowSize) -> str:
    return f"tensor{tuple(size.shape)}" if isinstance(size, torch.Tensor) else str(size)


def _check_cells(name: str, pos: torch.Tensor, valid: torch.Tensor, bounds, labels) -> None:
    """Raise if any valid cell of ``pos`` (last dim = coordinates) is outside ``[0, bound)``."""
    for i, (bound, label) in enumerate(zip(bounds, labels)):
        c = pos[..., i]
        bad = valid & ((c < 0) | (c >= bound))
        if bool(bad.any()):
            where = tuple(int(j) for j in bad.nonzero()[0])
            raise ValueError(f"{name}{list(where)}: {label} {int(c[where])} is out of range [0, {bound})")


def _check_size_tensor(name: str, size: WindowSize, batch: int, queries: int, device) -> WindowSize:
    check_window_size(name, size)
    if isinstance(size, torch.Tensor):
        if tuple(size.shape) != (batch, queries):
            raise ValueError(f"{name} must be an odd int or a LongTensor [B, Q] = [{batch}, {queries}], "
                             f"got shape {tuple(size.shape)}")
        check_device(name, size, device, "the positions")
        size = size.long()
    return size


def _half_sizes(size: WindowSize, rows: int, device) -> torch.Tensor:
    """``[B * Q]`` half window sizes; -1 where the size is 0 (no window)."""
    if isinstance(size, torch.Tensor):
        s = size.reshape(rows)
        return torch.where(s > 0, s // 2, torch.full_like(s, -1))
    return torch.full((rows,), size // 2 if size > 0 else -1, dtype=torch.long, device=device)


@not_traced("sparse_bias: local_windows builds a window index whose size depends on the values of the positions "
            "(data-dependent), so it runs outside torch.compile's graph; with fullgraph=True (or torch.export) build "
            "the index before the compiled region and pass it in (docs/limitations.md, 'torch.compile')")
def local_windows(layout: KeyLayout, bev_pos: Optional[torch.Tensor] = None,
                  cam_pos: Optional[torch.Tensor] = None, bev_window: WindowSize = 15,
                  cam_window: WindowSize = 15) -> WindowIndex:
    """Gather every query's local window keys into a CSR `WindowIndex`.

    A query centred on cell ``(r, c)`` with window size ``w`` gets the cells ``(r + dy, c + dx)`` with
    ``|dy|, |dx| <= w // 2`` that lie on its grid: windows are clipped in 2-D at the grid borders, never
    wrap into the next row and never cross into another camera view. Fully vectorised.

    Args:
        layout: the `KeyLayout` of the memory.
        bev_pos: LongTensor ``[B, Q, 2]`` of BEV cells ``(row, col)``; ``row < 0`` = no BEV window.
            None = no BEV windows at all. Any signed integer dtype; unsigned dtypes (uint8) are refused, as they
            cannot hold -1.
        cam_pos: LongTensor ``[B, Q, 3]`` of camera cells ``(view, row, col)``, or ``[B, Q, M, 3]`` for up
            to ``M`` views per query (a point seen by two overlapping cameras gets a window in each);
            ``view < 0`` = no window. A query may not name the same view twice.
        bev_window: odd window size (0 = none), or a LongTensor ``[B, Q]`` of per-query sizes
            (adaptive windows; 0 = no window for that query).
        cam_window: the same for the camera windows.

    Returns:
        `WindowIndex` with ``indptr [B * Q + 1]`` and ``key``, ``source``, ``dy``, ``dx [nnz]``; valid by
        construction, so it comes out already validated (`WindowIndex.validate` returns at once).

    Under ``torch.compile`` the function is not traced (its output size depends on the data): called inside a
    compiled region it breaks the graph there once, without a warning, and runs eagerly; with ``fullgraph=True``
    dynamo refuses the call with an ``Unsupported`` error quoting this limitation -- build the index before the
    compiled region and pass it in.

    Example:

        >>> import torch, sparse_bias as sb
        >>> layout = sb.KeyLayout(bev_shape=(180, 180), cam_shape=(6, 40, 100))
        >>> bev_pos = torch.tensor([[[0, 0], [90, 90]]])          # B=1, Q=2; a corner and the centre
        >>> cam_pos = torch.tensor([[[2, 20, 50], [-1, 0, 0]]])   # the second query is seen by no camera
        >>> win = sb.local_windows(layout, bev_pos, cam_pos, bev_window=15, cam_window=15)
        >>> win.counts().tolist()                                 # corner window clipped to 8 x 8
        [[289, 225]]
    """
    if not isinstance(layout, KeyLayout):
        raise TypeError(f"layout must be a KeyLayout, got {type(layout).__name__}")
    if bev_pos is None and cam_pos is None:
        raise ValueError("local_windows needs bev_pos, cam_pos or both; got neither")

    batch = queries = device = None
    if bev_pos is not None:
        check_tensor("bev_pos", bev_pos, ndim=(3,), integer=True, signed=True)
        if bev_pos.shape[-1] != 2:
            raise ValueError(f"bev_pos must be [B, Q, 2] (row, col), got shape {tuple(bev_pos.shape)}")
        if layout.bev_shape is None:
            raise ValueError("bev_pos was given but the layout has no BEV part (bev_shape=None)")
        batch, queries = bev_pos.shape[:2]
        device = bev_pos.device
        bev_pos = bev_pos.long()
        _check_cells("bev_pos", bev_pos, bev_pos[..., 0] >= 0, layout.bev_shape, ("row", "col"))
    if cam_pos is not None:
        check_tensor("cam_pos", cam_pos, ndim=(3, 4), integer=True, signed=True)
        if cam_pos.shape[-1] != 3:
            raise ValueError(f"cam_pos must be [B, Q, 3] or [B, Q, M, 3] (view, row, col), "
                             f"got shape {tuple(cam_pos.shape)}")
        if layout.cam_shape is None:
            raise ValueError("cam_pos was given but the layout has no camera part (cam_shape=None)")
        if cam_pos.dim() == 3:
            cam_pos = cam_pos.unsqueeze(2)
        if batch is not None and tuple(cam_pos.shape[:2]) != (batch, queries):
            raise ValueError(f"cam_pos is for [B, Q] = {list(cam_pos.shape[:2])} but bev_pos is for "
                             f"[{batch}, {queries}]")
        if device is not None:
            check_device("cam_pos", cam_pos, device, "bev_pos")
        batch, queries = cam_pos.shape[:2]
        device = cam_pos.device
        cam_pos = cam_pos.long()
        _check_cells("cam_pos", cam_pos, cam_pos[..., 0] >= 0, layout.cam_shape, ("view", "row", "col"))
        # Windows of one query must come out in ascending key order: sort its views.
        view_sorted, order = cam_pos[..., 0].sort(dim=-1)
        cam_pos = cam_pos.gather(2, order.unsqueeze(-1).expand_as(cam_pos))
        dup = (view_sorted[..., 1:] == view_sorted[..., :-1]) & (view_sorted[..., 1:] >= 0)
        if bool(dup.any()):
            b, q, _ = (int(j) for j in dup.nonzero()[0])
            raise ValueError(f"cam_pos[{b}, {q}] names view {int(view_sorted[b, q][1:][dup[b, q]][0])} twice")

    if bev_pos is not None:
        bev_window = _check_size_tensor("bev_window", bev_window, batch, queries, device)
    if cam_pos is not None:
        cam_window = _check_size_tensor("cam_window", cam_window, batch, queries, device)

    rows = batch * queries
    # One "segment" per (query, window): the BEV window first, then the camera windows in view order.
    cy, cx, half, grid_h, grid_w, base, src = [], [], [], [], [], [], []
    if bev_pos is not None:
        h, w = layout.bev_shape
        r = _half_sizes(bev_window, rows, device)
        p = bev_pos.reshape(rows, 1, 2)
        cy.append(p[..., 0])
        cx.append(p[..., 1])
        half.append(torch.where(p[..., 0] >= 0, r.unsqueeze(1), -1))
        grid_h.append(torch.full((1,), h, device=device))
        grid_w.append(torch.full((1,), w, device=device))
        base.append(torch.zeros(rows, 1, dtype=torch.long, device=device))
        src.append(torch.full((1,), SOURCE_BEV, device=device))
    if cam_pos is not None:
        _, hc, wc = layout.cam_shape
        m = cam_pos.shape[2]
        r = _half_sizes(cam_window, rows, device)
        p = cam_pos.reshape(rows, m, 3)
        cy.append(p[..., 1])
        cx.append(p[..., 2])
        half.append(torch.where(p[..., 0] >= 0, r.unsqueeze(1), -1))
        grid_h.append(torch.full((m,), hc, device=device))
        grid_w.append(torch.full((m,), wc, device=device))
        base.append(layout.cam_offset + p[..., 0].clamp(min=0) * (hc * wc))
        src.append(torch.full((m,), SOURCE_CAM, device=device))
    cy, cx, half, base = (torch.cat(t, dim=1) for t in (cy, cx, half, base))      # [rows, S]
    grid_h, grid_w, src = (torch.cat(t) for t in (grid_h, grid_w, src))           # [S]
    num_seg = cy.shape[1]

    # Clip every window to its grid in 2-D; an absent window (half = -1) gets an empty range.
    y0 = (cy - half).clamp(min=0)
    y1 = torch.minimum(cy + half, grid_h - 1)
    x0 = (cx - half).clamp(min=0)
    x1 = torch.minimum(cx + half, grid_w - 1)
    ncols = (x1 - x0 + 1).clamp(min=0)
    seg_counts = ((y1 - y0 + 1).clamp(min=0) * ncols).masked_fill(half < 0, 0)   # [rows, S]

    indptr = torch.zeros(rows + 1, dtype=torch.long, device=device)
    torch.cumsum(seg_counts.sum(dim=1), dim=0, out=indptr[1:])
    nnz = int(indptr[-1])

    # Expand segments to entries: entry t of a segment is cell (y0 + t // ncols, x0 + t % ncols). Per-segment
    # tables are gathered once per entry; the arithmetic on entries runs in int32 (cells are small).
    seg_counts = seg_counts.reshape(-1)
    seg_id = torch.repeat_interleave(torch.arange(seg_counts.numel(), device=device), seg_counts,
                                     output_size=nnz)
    i32 = torch.int32
    seg_start = (torch.cumsum(seg_counts, 0) - seg_counts).to(i32)
    top_left = (base + y0 * grid_w + x0).reshape(-1)                          # key of the first cell
    nc = ncols.reshape(-1).to(i32)[seg_id]
    t = torch.arange(nnz, dtype=i32, device=device) - seg_start[seg_id]
    ry = torch.div(t, nc, rounding_mode="floor")
    rx = t - ry * nc
    width = grid_w.to(i32).expand_as(y0).reshape(-1)
    key = top_left[seg_id] + ry * width[seg_id]
    key += rx
    dy = (y0 - cy).reshape(-1).to(i32)[seg_id] + ry                          # int32: no wrap on large grids
    dx = (x0 - cx).reshape(-1).to(i32)[seg_id] + rx
    source = src.to(torch.int8).expand_as(y0).reshape(-1)[seg_id]

    win = WindowIndex(layout, batch, queries, indptr, key, source, dy, dx,
                      bev_pos=bev_pos, cam_pos=cam_pos,
                      bev_window=bev_window if bev_pos is not None else 0,
                      cam_window=cam_window if cam_pos is not None else 0)
    win._cache["row"] = torch.div(seg_id, num_seg, rounding_mode="floor")
    win._cache["validated"] = True                   # keys in range, ascending and unique by construction
    win.entries()
    return win
