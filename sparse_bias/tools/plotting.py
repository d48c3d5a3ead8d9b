"""Plots of a sparse bias on the BEV grid and the camera views, and of benchmark rows (needs matplotlib, a dev
extra)."""
from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..bias import SparseBias

__all__ = ["QueryPanel", "query_panels", "query_bias_maps", "query_bias_figure", "plot_query_bias",
           "comparison_figure", "plot_comparison", "plot_losses", "machine_description"]


@dataclass
class QueryPanel:
    """One query's window on one grid (the BEV grid or one camera view).

    Attributes:
        kind: ``"bev"`` or ``"camera"``.
        view: the camera view (None for the BEV grid).
        values: float64 ``[H, W]`` (``[Hc, Wc]`` for a view) on the CPU: the bias inside the window, NaN outside.
        centre: ``(row, col)`` of the cell the window is centred on (the projected reference point).
        box: ``(row0, row1, col0, col1)``, the window's first and last row and column (clipped at the borders).
        size: the window size the index was built with (odd; the box is smaller where the window is clipped).
    """

    kind: str
    view: Optional[int]
    values: torch.Tensor
    centre: Tuple[int, int]
    box: Tuple[int, int, int, int]
    size: int = 0

    @property
    def clipped(self) -> bool:
        """Whether the grid's border cuts the window."""
        r0, r1, c0, c1 = self.box
        return (r1 - r0 + 1, c1 - c0 + 1) != (self.size, self.size)


def query_panels(bias: SparseBias, batch: int, query: int, head: Optional[int] = None) -> List[QueryPanel]:
    """The windows of one query, each on its own grid: the BEV window first (if any), then one panel per camera
    view the query projects into, in view order.

    Args:
        bias: the `SparseBias`.
        batch: which batch element.
        query: which query.
        head: which head for per-head values (default: the mean over heads).

    Returns:
        a list of `QueryPanel`; empty when the query has no window.
    """
    idx = bias.index
    layout = idx.layout
    if not 0 <= batch < idx.batch_size or not 0 <= query < idx.num_queries:
        raise ValueError(f"batch and query must index the bias's [B, Q] = [{idx.batch_size}, {idx.num_queries}], "
                         f"got batch={batch}, query={query}")
    row = batch * idx.num_queries + query
    start, end = (int(x) for x in idx.indptr[row:row + 2].cpu())
    keys = idx.key[start:end].cpu()
    dy, dx = idx.dy[start:end].cpu().long(), idx.dx[start:end].cpu().long()
    values = bias.values.detach()[start:end].cpu().double()
    if values.dim() == 2:
        values = values.mean(1) if head is None else values[:, head]
    nbev = layout.num_bev_keys
    grids = []                                                  # (kind, view, mask of the entries, shape, local key)
    if layout.bev_shape:
        grids.append(("bev", None, keys < nbev, layout.bev_shape, keys))
    if layout.cam_shape:
        views, hc, wc = layout.cam_shape
        local = keys - nbev
        for v in range(views):
            grids.append(("camera", v, (keys >= nbev) & (local // (hc * wc) == v), (hc, wc), local - v * hc * wc))
    def size(window) -> int:
        return int(window if isinstance(window, int) else window[batch, query])
    panels = []
    for kind, view, sel, (h, w), local in grids:
        if not bool(sel.any()):
            continue
        rows, cols = local[sel] // w, local[sel] % w
        grid = torch.full((h, w), float("nan"), dtype=torch.float64)
        grid[rows, cols] = values[sel]
        centre = (int(rows[0] - dy[sel][0]), int(cols[0] - dx[sel][0]))
        box = (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max()))
        window = size(idx.bev_window if kind == "bev" else idx.cam_window)
        panels.append(QueryPanel(kind, view, grid, centre, box, window))
    return panels


def query_bias_maps(bias: SparseBias, batch: int, queries: Sequence[int], head: Optional[int] = None):
    """Dense bias of a few queries, summed, laid out on the layout's grids (`query_panels` keeps them apart).

    Args:
        bias: the `SparseBias`.
        batch: which batch element.
        queries: query indices (their biases are added up).
        head: which head for per-head values (default: mean over heads).

    Returns:
        ``(bev_map [H, W] or None, cam_maps [V, Hc, Wc] or None)`` float tensors on the CPU.
    """
    idx = bias.index
    layout = idx.layout
    rows = torch.as_tensor([batch * idx.num_queries + q for q in queries], device=idx.device)
    sel = torch.isin(idx.row, rows)
    values = bias.values.detach()
    if values.dim() == 2:
        values = values.mean(1) if head is None else values[:, head]
    dense = torch.zeros(layout.num_keys, dtype=torch.float64, device=idx.device)
    dense.index_add_(0, idx.key[sel], values[sel].double())
    dense = dense.cpu()
    bev = dense[:layout.num_bev_keys].view(*layout.bev_shape) if layout.bev_shape else None
    cam = dense[layout.num_bev_keys:].view(*layout.cam_shape) if layout.cam_shape else None
    return bev, cam


def _colour_scale(panels: Sequence[QueryPanel]):
    """A sequential map from 0 to the largest magnitude when the values have one sign, a diverging one centred
    at 0 when they have both: ``(cmap, vmin, vmax)``."""
    import matplotlib

    finite = [p.values[~p.values.isnan()] for p in panels]
    values = torch.cat(finite) if finite else torch.zeros(1, dtype=torch.float64)
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 < hi:
        top = max(-lo, hi)
        cmap, vmin, vmax = "RdBu_r", -top, top
    elif hi > 0:
        cmap, vmin, vmax = "viridis", 0.0, hi
    elif lo < 0:
        cmap, vmin, vmax = "viridis_r", lo, 0.0
    else:
        cmap, vmin, vmax = "viridis", 0.0, 1.0
    cmap = matplotlib.colormaps[cmap] if hasattr(matplotlib, "colormaps") else matplotlib.cm.get_cmap(cmap)
    return cmap.with_extremes(bad="#e6e6e6"), vmin, vmax          # grey: no bias entry (outside the window)


def _size(box) -> str:
    """``"<rows>x<cols>"`` of a box."""
    return f"{box[1] - box[0] + 1}x{box[3] - box[2] + 1}"


def _draw_window(ax, panel: QueryPanel, scale: dict, bev: bool, pad: Optional[int] = None):
    """Draw ``panel`` on ``ax``: the bias (grey outside the window), the window's outline, the projected point
    (black with a white halo, visible on any colour); ``pad``: zoom to the window and ``pad`` cells around it."""
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    halo = [patheffects.withStroke(linewidth=4, foreground="white")]
    image = ax.imshow(panel.values.numpy(), interpolation="nearest", origin="lower" if bev else "upper",
                      aspect="equal", **scale)
    r0, r1, c0, c1 = panel.box
    ax.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, edgecolor="black",
                           linewidth=1.3, label="window", path_effects=halo))
    ax.plot([panel.centre[1]], [panel.centre[0]], marker="+", color="black", markersize=12 if pad is None else 9,
            markeredgewidth=2.0, linestyle="none", label="projected point", path_effects=halo)
    if pad is not None:
        ax.set_xlim(c0 - pad - 0.5, c1 + pad + 0.5)
        rows = (r0 - pad - 0.5, r1 + pad + 0.5)
        ax.set_ylim(*(rows if bev else rows[::-1]))
        ax.set_xticks([])
        ax.set_yticks([])
    return image


def query_bias_figure(bias: SparseBias, batch: int = 0, queries: Sequence[int] = (0,), head: Optional[int] = None,
                      title: Optional[str] = None, view_names: Optional[Sequence[str]] = None):
    """A matplotlib figure of the bias of ``queries``: one row per query, its BEV window and the camera views it
    projects into, each on its grid in cells, the projected cell marked (``+``) and the window outlined.

    One colour scale for the whole figure (a sequential map from 0 when the values have one sign, diverging
    around 0 when they have both), with a colour bar; grey cells hold no bias entry.

    Args:
        bias: the `SparseBias` (values ``[nnz]`` or ``[nnz, H]``).
        batch: which batch element.
        queries: the queries, one row each.
        head: which head for per-head values (default: the mean over heads).
        title: the figure's title.
        view_names: names of the camera views (default ``camera view <v>``).

    Returns:
        the ``matplotlib.figure.Figure``; each axes is labelled (``Axes.get_label``) ``"query <q>: BEV"``,
        ``"query <q>: camera view <v>"`` or ``"query <q>: empty"``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = [int(q) for q in queries]
    if not queries:
        raise ValueError("queries must name at least one query, got none")
    rows = [query_panels(bias, batch, q, head) for q in queries]
    cmap, vmin, vmax = _colour_scale([p for row in rows for p in row])
    layout = bias.index.layout
    cam_columns = max([sum(p.kind == "camera" for p in row) for row in rows] + [0 if layout.bev_shape else 1])
    bev_side = 3.4
    cam_width = bev_side
    if layout.cam_shape:
        cam_width = min(5.0, max(3.0, bev_side * layout.cam_shape[2] / layout.cam_shape[1] * 0.6))
    width_ratios = ([bev_side] if layout.bev_shape else []) + [cam_width] * cam_columns
    fig = plt.figure(figsize=(sum(width_ratios) + 1.6, 3.3 * len(queries) + 0.9), constrained_layout=True)
    grid = fig.add_gridspec(len(queries), len(width_ratios), width_ratios=width_ratios)
    image = None
    what = "mean over heads" if bias.values.dim() == 2 and head is None else (
        f"head {head}" if head is not None else "shared by the heads")
    for r, (query, panels) in enumerate(zip(queries, rows)):
        slots = list(range(len(width_ratios)))
        by_slot = {}
        cams = [p for p in panels if p.kind == "camera"]
        bev = [p for p in panels if p.kind == "bev"]
        if layout.bev_shape:
            by_slot[slots.pop(0)] = bev[0] if bev else None
        for slot, panel in zip(slots, cams):
            by_slot[slot] = panel
        for slot in range(len(width_ratios)):
            ax = fig.add_subplot(grid[r, slot])
            panel = by_slot.get(slot)
            ax.set_label(f"query {query}: " + ("BEV" if slot == 0 and layout.bev_shape else
                                               "empty" if panel is None else f"camera view {panel.view}"))
            if panel is None:
                if slot == 0 and layout.bev_shape:       # no BEV window: say so on an empty BEV grid
                    h, w = layout.bev_shape
                    ax.set_xlim(-0.5, w - 0.5)
                    ax.set_ylim(-0.5, h - 0.5)
                    ax.text(0.5, 0.5, "no BEV window\n(the point is off the grid)", ha="center", va="center",
                            transform=ax.transAxes)
                    ax.set_title(f"query {query}: BEV", fontsize=10)
                    ax.set_xlabel("BEV x (cells)")
                    ax.set_ylabel("BEV y (cells)")
                else:
                    ax.axis("off")
                    if slot == len(width_ratios) - 1 and not cams:
                        ax.text(0.5, 0.5, "seen by no camera", ha="center", va="center", transform=ax.transAxes)
                continue
            bev_panel = panel.kind == "bev"
            image = _draw_window(ax, panel, dict(cmap=cmap, vmin=vmin, vmax=vmax), bev_panel)
            legend_loc = "upper right"
            if bev_panel:                     # the BEV window is small on its grid: a zoom in a free corner
                h, w = panel.values.shape
                top, right = panel.centre[0] >= h / 2, panel.centre[1] >= w / 2     # the window's quadrant
                inset = ax.inset_axes([0.03 if right else 0.55, 0.03 if top else 0.55, 0.42, 0.42])
                inset.set_label(ax.get_label() + " (zoom)")
                _draw_window(inset, panel, dict(cmap=cmap, vmin=vmin, vmax=vmax), True, pad=2)
                ax.indicate_inset_zoom(inset, edgecolor="0.3")
                legend_loc = ("upper " if not top else "lower ") + ("left" if not right else "right")
            where = f"point at row {panel.centre[0]}, col {panel.centre[1]}; window {panel.size}x{panel.size}"
            if panel.clipped:
                where += f", clipped to {_size(panel.box)}"
            if bev_panel:
                ax.set_title(f"query {query}: BEV\n{where}", fontsize=9.5)
                ax.set_xlabel("BEV x (cells)")
                ax.set_ylabel("BEV y (cells)")
            else:
                name = view_names[panel.view] if view_names else f"camera view {panel.view}"
                ax.set_title(f"query {query}: {name}\n{where}", fontsize=9.5)
                ax.set_xlabel("image column (cells)")
                ax.set_ylabel("image row (cells)")
            if r == 0 and slot == 0:
                ax.legend(loc=legend_loc, fontsize=7, framealpha=0.85)
    if image is not None:
        bar = fig.colorbar(image, ax=fig.axes, shrink=min(0.9, 0.35 + 0.15 * len(queries)), pad=0.01)
        bar.set_label(f"bias ({what}); grey: no entry")
    fig.suptitle(title or f"bias of queries {queries} (batch {batch})")
    return fig


def plot_query_bias(bias: SparseBias, path: str, batch: int = 0, queries: Sequence[int] = (0,),
                    head: Optional[int] = None, title: Optional[str] = None,
                    view_names: Optional[Sequence[str]] = None) -> str:
    """Save `query_bias_figure` as a PNG at ``path`` (one row per query) and return ``path``."""
    import matplotlib.pyplot as plt

    fig = query_bias_figure(bias, batch, queries, head, title, view_names)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def machine_description() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, `platform.processor` elsewhere), the OS and torch's thread
    count, e.g. ``"AMD EPYC 7B13, Linux, 2 threads"``."""
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:  # pragma: no cover - not Linux
        pass
    name = name or platform.processor() or platform.machine() or "unknown CPU"
    return f"{name}, {platform.system()}, {torch.get_num_threads()} threads"


def comparison_figure(rows, title: Optional[str] = None, setup: Optional[str] = None):
    """A matplotlib figure of benchmark rows (from `sparse_bias.tools.benchmark`): time in seconds and peak memory in MiB
    of each variant, forward and forward + backward side by side, each bar labelled with its value and its
    ratio to unbiased SDPA (the row named ``sdpa``, else the first).

    Args:
        rows: the benchmark's rows (``time_s``, ``peak_rss_mib``, and ``fwd_time_s`` / ``fwd_peak_rss_mib`` when
            the forward was measured on its own).
        title: the first line of the title.
        setup: what was run (shape and dtype), the second line of the title; the machine
            (`machine_description`) is added.

    Returns:
        the ``matplotlib.figure.Figure``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] + (f"\n({r['chosen']})" if r.get("chosen") else "") for r in rows]
    base = next((r for r in rows if r["variant"] == "sdpa"), rows[0])
    passes = [("forward", "fwd_time_s", "fwd_peak_rss_mib")] if "fwd_time_s" in base else []
    passes.append(("forward + backward" if passes else "measured step", "time_s", "peak_rss_mib"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    width = 0.8 / len(passes)
    xs = list(range(len(rows)))
    for ax, unit, label in ((axes[0], 0, "time per step [s] (median)"),
                            (axes[1], 1, "peak RSS [MiB] (a fresh process, inputs included)")):
        top = 0.0
        for i, (pass_name, time_key, mem_key) in enumerate(passes):
            key = (time_key, mem_key)[unit]
            values = [float(r.get(key) or 0.0) for r in rows]
            ref = float(base.get(key) or 0.0)
            top = max([top] + values)
            bars = ax.bar([x + (i - (len(passes) - 1) / 2) * width for x in xs], values, width,
                          color=f"C{i}", label=pass_name)
            fmt = "{:.3f} s" if unit == 0 else "{:.0f} MiB"
            ax.bar_label(bars, labels=[fmt.format(v) + (f"\n{v / ref:.2f}x" if ref else "") for v in values],
                         fontsize=8, padding=2)
        ax.set_ylim(0, top * 1.25 or 1.0)
        ax.set_xticks(xs)
        ax.set_xticklabels(names, fontsize=9)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0].set_title("time (labels: value and x unbiased SDPA)", fontsize=10)
    axes[1].set_title("peak memory (labels: value and x unbiased SDPA)", fontsize=10)
    lines = [title or "sparse-bias attention vs unbiased SDPA and the dense-bias version"]
    lines.append(", ".join(x for x in (setup, machine_description(), f"torch {torch.__version__}") if x))
    fig.suptitle("\n".join(lines), fontsize=11)
    return fig


def plot_comparison(rows, path: str, title: Optional[str] = None, setup: Optional[str] = None) -> str:
    """Save `comparison_figure` as a PNG at ``path`` and return ``path``."""
    import matplotlib.pyplot as plt

    fig = comparison_figure(rows, title, setup)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_losses(curves, path: str, title: str) -> str:
    """Save a PNG of training-loss curves: ``curves`` maps a name to a list of per-step losses (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, losses in curves.items():
        ax.plot(losses, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
