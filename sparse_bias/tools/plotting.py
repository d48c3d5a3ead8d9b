"""Plots of a sparse bias on the BEV grid and the camera views (needs matplotlib, a dev extra)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..bias import SparseBias

__all__ = ["query_bias_maps", "plot_query_bias", "plot_comparison", "plot_losses"]


def query_bias_maps(bias: SparseBias, batch: int, queries: Sequence[int], head: Optional[int] = None):
    """Dense bias of a few queries, summed, laid out on the layout's grids.

    Args:
        bias: the `SparseBias`.
        batch: which batch element.
        queries: query indices to draw (their biases are added up).
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


def plot_query_bias(bias: SparseBias, path: str, batch: int = 0, queries: Sequence[int] = (0,),
                    head: Optional[int] = None, title: Optional[str] = None) -> str:
    """Save a PNG: the BEV heatmap and every camera view of the summed bias of ``queries``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bev, cam = query_bias_maps(bias, batch, queries, head)
    views = 0 if cam is None else cam.shape[0]
    fig = plt.figure(figsize=(15, 6), constrained_layout=True)
    per_row = (views + 1) // 2
    grid = fig.add_gridspec(2, 1 + per_row, width_ratios=[1.3] + [1] * per_row)
    vmax = max(float(bev.abs().max()) if bev is not None else 0.0,
               float(cam.abs().max()) if cam is not None else 0.0, 1e-12)
    style = dict(cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    image = None
    if bev is not None:
        ax = fig.add_subplot(grid[:, 0])
        image = ax.imshow(bev.numpy(), origin="lower", **style)
        ax.set_title(f"BEV {bev.shape[0]}x{bev.shape[1]} (row = lidar y, col = lidar x)")
        ax.set_xlabel("col")
        ax.set_ylabel("row")
    for v in range(views):
        ax = fig.add_subplot(grid[v // per_row, 1 + v % per_row])
        image = ax.imshow(cam[v].numpy(), **style)
        ax.set_title(f"camera view {v}")
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=fig.axes, shrink=0.6, label="bias")
    fig.suptitle(title or f"bias of queries {list(queries)} (batch {batch})")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_comparison(rows, path: str, title: str = "sparse bias vs the dense-bias version") -> str:
    """Save a PNG of benchmark rows (from `sparse_bias.benchmark`): time and peak memory of each variant
    relative to unbiased SDPA (the first row)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    colors = [f"C{i}" for i in range(len(rows))]
    base = rows[0]["peak_rss_mib"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, values, label in ((axes[0], [r["time_ratio"] for r in rows], "time / unbiased SDPA"),
                              (axes[1], [r["peak_rss_mib"] / base for r in rows], "peak RSS / unbiased SDPA")):
        bars = ax.bar(names, values, color=colors)
        ax.bar_label(bars, fmt="%.2fx")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
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
