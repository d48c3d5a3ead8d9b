"""The library's main job on a synthetic CMT scene: ``python -m sparse_bias.tools.demo [--quick] [--out DIR]``.

1. Projects 900 random reference points onto the BEV grid and six synthetic cameras, builds their local
   windows and the sparse bias, prints its size against the dense version's ``[B, Q, K]`` fp32
   tensor, and writes ``bias_queries.png``: the bias of a few queries, one row per query (its BEV window and
   the camera views it projects into, the projected point marked, the window outlined).
2. Attention at the CMT shape (B=2, H=8, D=32, Q=900, K=56400): checks the sparse-bias attention against
   the dense reference (output and all gradients), then prints time and peak memory of forward and forward +
   backward for unbiased SDPA, sparse-bias attention (``auto`` backend) and the dense-bias version, each in a
   fresh process (`sparse_bias.tools.benchmark`), and writes ``attention_comparison.png``. It takes minutes on a CPU
   and about 11.5 GB of RAM (the dense-bias variant, skipped where that is not free): it starts with an estimate
   of both, each phase with its own, and shows progress on stderr. ``--no-attention`` skips this part.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from ..bias import window_bias
from ..windows import local_windows
from . import benchmark
from .cli import Parser, non_negative_int, odd_positive_int, positive_int, progress_bar, run_cli
from .estimates import format_duration
from .memory import available_gib, dense_bias_gb
from .plotting import plot_comparison, plot_query_bias
from .synthetic import CMT_CONFIGS, synthetic_scene

__all__ = ["main", "cli"]


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:8.1f} MiB"


def main(argv=None) -> dict:
    parser = Parser.for_tool("demo", __doc__)
    parser.add_argument("--out", default="demo_out", help="folder for the PNG")
    parser.add_argument("--quick", action="store_true", help="small sizes (used by the tests)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="batch size B of the synthetic scene")
    parser.add_argument("--queries", type=positive_int, default=900, quick=64, help="object queries Q")
    parser.add_argument("--window", type=odd_positive_int, nargs=2, default=(15, 15), metavar=("BEV", "CAM"),
                        help="BEV and camera window sizes (odd)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the synthetic scene and weights")
    parser.add_argument("--no-attention", dest="attention", action="store_false",
                        help="skip the attention comparison (part 2)")
    args = parser.parse_args(argv)
    config = "small" if args.quick else "fusion"
    queries = args.queries
    os.makedirs(args.out, exist_ok=True)

    scene = synthetic_scene(args.batch_size, queries, config=config, seed=args.seed)
    layout = scene.layout
    print(f"== sparse_bias demo: synthetic CMT scene ({config}) ==")
    print(f"layout      : {layout}")
    print(f"queries     : B={args.batch_size} x Q={queries}; "
          f"{int((scene.bev_pos[..., 0] >= 0).sum())} with a BEV cell, "
          f"{int((scene.cam_pos[..., 0, 0] >= 0).sum())} seen by a camera, "
          f"{int((scene.cam_pos[..., 1, 0] >= 0).sum())} by two")

    bev_w, cam_w = args.window
    times = []
    for _ in progress_bar(range(5), desc="building the windows", unit="build", leave=False):   # TTY only
        start = time.perf_counter()
        win = local_windows(layout, scene.bev_pos, scene.cam_pos, bev_window=bev_w, cam_window=cam_w)
        times.append(time.perf_counter() - start)
    gen = torch.Generator().manual_seed(args.seed)
    lidar_w = torch.rand(args.batch_size, queries, generator=gen)        # AQR-style weights in [0, 1]
    camera_w = torch.rand(args.batch_size, queries, generator=gen)
    bias = window_bias(win, lidar_w, camera_w, scale=1.0)
    dense_bytes = args.batch_size * queries * layout.num_keys * 4
    print(f"windows     : {bev_w} (BEV) / {cam_w} (camera); nnz = {win.nnz} "
          f"({win.nnz / (args.batch_size * queries):.0f} keys per query of {layout.num_keys}); "
          f"built in {statistics.median(times) * 1e3:.1f} ms (median of 5)")
    print(f"bias memory : sparse {_mib(bias.nbytes())}  (index {_mib(win.nbytes())} + values "
          f"{_mib(bias.values.numel() * bias.values.element_size())})")
    print(f"              dense  {_mib(dense_bytes)}  ([{args.batch_size}, {queries}, {layout.num_keys}] fp32, "
          f"the dense version)  -> {dense_bytes / bias.nbytes():.0f}x smaller")

    result = {"nnz": win.nnz, "sparse_bytes": bias.nbytes(), "dense_bytes": dense_bytes, "png": None}
    result["png"] = _plot(args, scene, bias)
    if args.attention:
        result["attention"] = _attention(args)
    return result


def _plot(args, scene, bias):
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # pragma: no cover - matplotlib is a dev extra
        print("plot        : skipped (pip install matplotlib)")
        return None
    two_views = (scene.cam_pos[0, :, 1, 0] >= 0).nonzero().flatten()[:1].tolist()
    one_view = (scene.cam_pos[0, :, 0, 0] >= 0).nonzero().flatten()[:2].tolist()
    picked = list(dict.fromkeys(two_views + one_view + [0]))[:3]
    bev_w, cam_w = args.window
    path = plot_query_bias(bias, os.path.join(args.out, "bias_queries.png"), batch=0, queries=picked,
                           title=f"flat bias (AQR weight x scale 1.0) of queries {picked} of batch 0, windows "
                                 f"{bev_w}x{bev_w} (BEV) / {cam_w}x{cam_w} (camera)\none row per query: its BEV "
                                 "window (zoomed in the inset) and the camera views it projects into")
    print(f"plot        : {path} (queries {picked})")
    return path


def _attention(args):
    print("\n== attention: sparse bias vs unbiased SDPA vs the dense-bias version (fp32, forward + backward) ==")
    if args.quick:                                   # the benchmark's --quick sizes, but for a --queries typed
        bench_args = ["--quick"] + (["--queries", str(args.queries)] if "queries" in getattr(args, "_explicit", ()) else [])
    else:
        bench_args = ["--queries", str(args.queries), "--batch-size", str(args.batch_size)]
    variants = ["sdpa", "sparse-auto", "dense-bias"]
    sizes = benchmark.parse_args(bench_args)                  # the sizes the benchmark will run
    keys = CMT_CONFIGS[sizes.config].layout.num_keys
    need, free = dense_bias_gb(sizes.batch_size, sizes.heads, sizes.queries, keys), available_gib()
    print(f"memory      : the dense-bias variant needs about {need:.1f} GB of RAM "
          f"({'unknown' if free is None else f'{free:.1f} GB'} available)")
    if free is not None and free < need:
        variants.remove("dense-bias")
        print(f"              skipping the dense-bias variant: only {free:.1f} GB available (it needs about {need:.1f} GB)")
        # the exactness check's dense reference needs as much: check fewer queries (same layout and windows)
        check_queries = max(1, min(sizes.queries, int(sizes.queries * max(0.8 * free - 0.5, 0.0) / (need - 0.5))))
        bench_args += ["--check-queries", str(check_queries)]
        sizes = benchmark.parse_args(bench_args)
        print(f"              and checking exactness at Q={check_queries} (the dense reference needs as much)")
    total = benchmark.phase_estimates(sizes, variants)["total"]
    print(f"time        : about {format_duration(total.seconds)} on {torch.get_num_threads()} threads for the three "
          "phases below (exactness check, timing, peak memory), each announced by its own estimate; progress on "
          "stderr", flush=True)
    rows = benchmark.main(bench_args + ["--variants"] + variants)
    by = {r["variant"]: r for r in rows}
    base, sparse = by["sdpa"], by["sparse-auto"]
    line = (f"\nsummary     : sparse-bias attention ({sparse['chosen']} backend) is exact "
            f"(max rel. error {sparse['max_rel_error']:.1e} vs the dense reference) and takes "
            f"{sparse['time_ratio']:.2f}x the time and {sparse['peak_rss_mib'] / base['peak_rss_mib']:.2f}x "
            f"the peak memory of unbiased SDPA")
    if "dense-bias" in by:
        dense = by["dense-bias"]
        line += (f"; the dense-bias version takes {dense['time_ratio']:.2f}x and "
                 f"{dense['peak_rss_mib'] / base['peak_rss_mib']:.2f}x")
    print(line + ".")
    try:
        setup = (f"{sizes.config} layout, B={sizes.batch_size}, H={sizes.heads}, Q={sizes.queries}, K={keys}, "
                 f"D={sizes.head_dim}, windows {sizes.bev_window}/{sizes.cam_window}, {sizes.dtype}")
        path = plot_comparison(rows, os.path.join(args.out, "attention_comparison.png"), setup=setup)
        print(f"plot        : {path}")
    except ImportError:  # pragma: no cover - matplotlib is a dev extra
        pass
    return rows


def cli() -> int:
    """Console entry point ``sparse-bias-demo``."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
