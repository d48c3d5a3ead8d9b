"""Benchmark the AQR step: the dense local attention mask (current practice) against window attention.

    python -m sparse_bias.tools.aqr_benchmark [--queries 900] [--repeats 3] [--json FILE] [--quick]

At MoME's AQR shape (B=2, Q=900, C=256, 4 heads, CMT fusion memory of 56,400 keys, windows camera 15 /
BEV 5, fp32, forward + backward of the whole one-layer LAM decoder, all parameter and input gradients):

* ``lam-mask``: the current practice -- ``torch.nn.MultiheadAttention`` with the bool mask
  ``[B * heads, Q, K]`` built inside the step from the windows (as MoME / CMTTEST build it), called with
  ``need_weights=False`` so that it runs on PyTorch's fused SDPA (mmcv's wrapper leaves the default
  ``need_weights=True``, which also materialises the averaged weights: slower still);
* ``window``: `sparse_bias.nn.AQRWeightGenerator` (window attention, no dense mask);
* ``no-mask``: ``torch.nn.MultiheadAttention`` over all keys, no mask (``need_weights=False``);
* ``floor``: the attention replaced by a free op -- what no attention can remove (the K/V projections of
  the memory, norms, FFN, the weight head).

Exactness first (one process, fewer queries): ``window`` against ``lam-mask`` on the same parameters
(weights and every gradient). Then every variant runs in a fresh process of its own: one warm-up step, then
``--repeats`` timed steps (median), peak RSS and the step's own peak above its built inputs (peak RSS minus
the RSS once inputs and module exist). Finally ``window_attention`` alone against unbiased SDPA over all
keys at the same shape (interleaved in one process, forward + backward).
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

from ..nn import AQRWeightGenerator
from ..window_attention import select_window_backend, window_attention
from .benchmark import _peak_rss_mib, _rss_mib
from .cli import (Parser, odd_positive_int, positive_int, progress_bar, report_to_parent, run_cli, run_worker,
                  write_json)
from .synthetic import synthetic_scene

__all__ = ["VARIANTS", "CHECK_TOLERANCE", "format_table", "main", "cli"]

VARIANTS = ("lam-mask", "window", "no-mask", "floor")
CHECK_TOLERANCE = 1e-4


def _build(args, queries=None):
    queries = queries or args.queries
    scene = synthetic_scene(args.batch_size, queries, config=args.config, max_views=1, seed=0)
    torch.manual_seed(0)
    aqr = AQRWeightGenerator(args.embed_dims, num_heads=args.heads, dropout=0.0, layout=scene.layout,
                             window_sizes=[args.cam_window, args.bev_window])
    gen = torch.Generator().manual_seed(1)
    nk, c, b = scene.layout.num_keys, args.embed_dims, args.batch_size
    query = torch.randn(queries, b, c, generator=gen).requires_grad_()
    memory = torch.randn(nk, b, c, generator=gen).requires_grad_()
    pos = torch.randn(nk, b, c, generator=gen).requires_grad_()
    return aqr, scene, query, memory, pos


def _torch_mha(mask_mode: str):
    """A forward for the AQR's cross-attention module that runs ``torch.nn.MultiheadAttention`` on its own
    parameters (the dense versions' attention): with the dense LAM (``"dense"``), no mask, or none at all."""
    def forward(self, query, key=None, value=None, identity=None, query_pos=None, key_pos=None, attn_mask=None,
                key_padding_mask=None, **kwargs):
        identity = query if identity is None else identity
        q, k = query + query_pos, key + key_pos
        if mask_mode == "free":                  # the floor: projections kept, attention itself free
            c = self.embed_dims
            w, bias = self.attn.in_proj_weight, self.attn.in_proj_bias
            qp = F.linear(q, w[:c], bias[:c])
            kv = F.linear(k, w[c:2 * c], bias[c:2 * c]).mean() + F.linear(value, w[2 * c:], bias[2 * c:]).mean()
            return identity + self.attn.out_proj(qp + kv)
        mask = attn_mask if mask_mode == "dense" else None
        return identity + self.attn(q, k, value, attn_mask=mask, key_padding_mask=key_padding_mask,
                                    need_weights=False)[0]
    return forward


def _step(variant, aqr, scene, query, memory, pos, backward=True):
    mha = aqr.encoder.layers[0].attentions[0]
    mode = {"lam-mask": "dense", "no-mask": "none", "floor": "free"}.get(variant)
    if mode is None:
        mha.forward = type(mha).forward.__get__(mha)
    else:
        mha.forward = _torch_mha(mode).__get__(mha)
    out = aqr(query, memory, pos, bev_pos=scene.bev_pos, cam_pos=scene.cam_pos, dense_mask=variant == "lam-mask")
    if backward:
        (out.lidar_weights.sum() + 2 * out.camera_weights.sum()).backward()
    return out


def _params(aqr, query, memory, pos):
    return [query, memory, pos] + [p for p in aqr.parameters() if p.requires_grad]


def _check(args) -> Dict:
    aqr, scene, query, memory, pos = _build(args, args.check_queries)
    tensors = _params(aqr, query, memory, pos)
    results = {}
    for variant in ("lam-mask", "window"):
        out = _step(variant, aqr, scene, query, memory, pos, backward=False)
        loss = out.lidar_weights.sum() + 2 * out.camera_weights.sum()
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        results[variant] = [out.lidar_weights, out.camera_weights] + [g for g in grads if g is not None]
    err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
              for a, b in zip(results["window"], results["lam-mask"]))
    return {"max_rel_error": err, "queries": args.check_queries}


def _memory_and_time(args) -> Dict:
    aqr, scene, query, memory, pos = _build(args)
    setup = _rss_mib()
    tensors = _params(aqr, query, memory, pos)
    times = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        _step(args.worker, aqr, scene, query, memory, pos)
        if i:
            times.append(time.perf_counter() - start)
        for t in tensors:
            t.grad = None
    nnz = aqr.local_window(scene.bev_pos, scene.cam_pos).nnz
    return {"variant": args.worker, "time_s": statistics.median(times), "peak_rss_mib": _peak_rss_mib(),
            "setup_rss_mib": setup, "nnz": nnz}


def _attention_alone(args) -> Dict:
    """``window_attention`` vs unbiased SDPA over all keys, forward + backward, interleaved medians."""
    aqr, scene, *_ = _build(args)
    win = aqr.local_window(scene.bev_pos, scene.cam_pos)
    gen = torch.Generator().manual_seed(2)
    b, h, d, nk = args.batch_size, args.heads, args.embed_dims // args.heads, scene.layout.num_keys
    q, k, v = (torch.randn(b, h, n, d, generator=gen).requires_grad_() for n in (args.queries, nk, nk))
    grad = torch.randn(b, h, args.queries, d, generator=gen)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "window_attention": lambda: window_attention(q, k, v, win)}
    times = {name: {"fwd": [], "fwd+bwd": []} for name in fns}
    for i in range(args.repeats + 1):
        for name, fn in fns.items():
            for pass_ in ("fwd", "fwd+bwd"):
                start = time.perf_counter()
                out = fn()
                if pass_ == "fwd+bwd":
                    out.backward(grad)
                elapsed = time.perf_counter() - start
                q.grad = k.grad = v.grad = None
                if i:
                    times[name][pass_].append(elapsed)
    backend = select_window_backend(q)[0]
    return {name: {p: statistics.median(t) for p, t in passes.items()} for name, passes in times.items()} | {
        "backend": backend, "nnz": win.nnz}


def _run(args, mode: str, variant: str = "-") -> Dict:
    argv = ["--worker", variant, "--mode", mode,
            "--queries", str(args.queries), "--config", args.config, "--batch-size", str(args.batch_size),
            "--heads", str(args.heads), "--embed-dims", str(args.embed_dims), "--bev-window", str(args.bev_window),
            "--cam-window", str(args.cam_window), "--repeats", str(args.repeats),
            "--check-queries", str(args.check_queries)]
    return run_worker("sparse_bias.tools.aqr_benchmark", argv, f"AQR benchmark worker ({mode} {variant})")


def format_table(rows: List[Dict]) -> str:
    base = next(r for r in rows if r["variant"] == "lam-mask")
    base_extra = base["peak_rss_mib"] - base["setup_rss_mib"]
    lines = [f"{'variant':10s} {'time [s]':>9s} {'x lam-mask':>11s} {'peak RSS [MiB]':>15s} {'x lam-mask':>11s} "
             f"{'step peak over inputs [MiB]':>28s} {'x lam-mask':>11s}"]
    for r in rows:
        extra = r["peak_rss_mib"] - r["setup_rss_mib"]
        lines.append(f"{r['variant']:10s} {r['time_s']:9.3f} {r['time_s'] / base['time_s']:11.2f} "
                     f"{r['peak_rss_mib']:15.0f} {r['peak_rss_mib'] / base['peak_rss_mib']:11.2f} "
                     f"{extra:28.0f} {extra / base_extra:11.2f}")
    return "\n".join(lines)


def _parser() -> Parser:
    parser = Parser.for_tool("aqr_benchmark", __doc__)
    parser.add_argument("--config", default="fusion", quick="small", choices=["fusion", "small"],
                        help="CMT memory layout")
    parser.add_argument("--queries", type=positive_int, default=900, quick=32, help="object queries Q")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="B")
    parser.add_argument("--heads", type=positive_int, default=4, help="heads of the AQR attention; must divide --embed-dims")
    parser.add_argument("--embed-dims", type=positive_int, default=256, quick=32, help="C")
    parser.add_argument("--bev-window", type=odd_positive_int, default=5, help="BEV window of the LAM (odd)")
    parser.add_argument("--cam-window", type=odd_positive_int, default=15, help="camera window of the LAM (odd)")
    parser.add_argument("--repeats", type=positive_int, default=3, quick=1,
                        help="timed steps per variant, after a warm-up")
    parser.add_argument("--check-queries", type=positive_int, default=64, quick=16,
                        help="queries of the exactness check, same layout and windows")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="variants to run; lam-mask is the baseline and always runs (default: all)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run, used by the tests)")
    parser.add_worker_arguments(["check", "memory", "alone"], default="memory")
    return parser


def main(argv=None) -> Dict:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.embed_dims % args.heads:
        if "embed_dims" in args._explicit:
            dims = f"--embed-dims {args.embed_dims}"
        elif args.quick:
            dims = f"--embed-dims, which is {args.embed_dims} with --quick (give --embed-dims to change it)"
        else:
            dims = f"--embed-dims, {args.embed_dims} by default"
        fits = [h for h in range(1, min(args.embed_dims, 64) + 1) if args.embed_dims % h == 0]
        parser.error(f"--heads {args.heads} must divide {dims}; "
                     f"heads that divide {args.embed_dims}: {', '.join(map(str, fits))}")
    if args.worker:
        fn = {"check": _check, "memory": _memory_and_time, "alone": _attention_alone}[args.mode]
        report_to_parent(fn(args))
        return {}
    print(f"AQR step benchmark: {args.config} layout, B={args.batch_size}, Q={args.queries}, C={args.embed_dims}, "
          f"{args.heads} heads, windows camera {args.cam_window} / BEV {args.bev_window}, fp32, forward + backward; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; each variant in a fresh process, "
          f"median of {args.repeats} steps after a warm-up", flush=True)
    check = _run(args, "check")
    print(f"  exactness: window vs lam-mask at Q={check['queries']}, weights and every gradient: max relative "
          f"error {check['max_rel_error']:.1e}", flush=True)
    if not check["max_rel_error"] < CHECK_TOLERANCE:
        raise RuntimeError(f"window attention disagrees with the dense LAM: {check}")
    names = ["lam-mask"] + [v for v in args.variants if v != "lam-mask"]
    rows = []
    bar = progress_bar(names, desc="AQR step (a process per variant)", unit="variant", leave=False)   # TTY only
    for name in bar:
        bar.set_postfix_str(name)
        rows.append(_run(args, "memory", name))
        bar.clear()
        print(f"  {name}: {rows[-1]['time_s']:.3f} s, peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)
        bar.refresh()
    bar.close()
    print(format_table(rows))
    alone = _run(args, "alone")
    ratio = {p: alone["window_attention"][p] / alone["sdpa"][p] for p in ("fwd", "fwd+bwd")}
    print(f"window_attention alone ({alone['backend']} backend, nnz {alone['nnz']}) vs unbiased SDPA over all keys, "
          f"[B, H, Q, D] = [{args.batch_size}, {args.heads}, {args.queries}, {args.embed_dims // args.heads}]: "
          + ", ".join(f"{p} {alone['window_attention'][p]:.3f} s vs {alone['sdpa'][p]:.3f} s = {ratio[p]:.3f}x"
                      for p in ("fwd", "fwd+bwd")))
    result = {"check": check, "rows": rows, "attention_alone": alone}
    if args.json:
        write_json(args.json, result)
    return result


def cli() -> int:
    """Console entry point ``sparse-bias-aqr-benchmark``."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
