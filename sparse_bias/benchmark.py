"""Benchmark sparse-bias attention against unbiased SDPA and the dense-bias version.

    python -m sparse_bias.benchmark [--queries 900] [--config fusion] [--repeats 5] [--quick]

One process checks every variant's output and gradients (q, k, v and the AQR weights behind the bias)
against the dense reference on the same inputs. One process then times forward + backward of all
variants interleaved (per repeat, each variant once, after a warm-up round), so the ratios to unbiased
SDPA (the floor) are measured side by side. Finally every variant runs one warm-up and one measured step
in a fresh process of its own for its peak RSS.

Variants: ``sdpa`` (no bias), ``sparse-<backend>`` (``auto`` and each backend), ``dense-bias``
(``scaled_dot_product_attention`` with the materialised ``[B, 1, Q, K]`` bias -- the origin design).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Dict, List

import torch

from .attention import dense_bias_attention, select_backend, sparse_bias_attention
from .backends import torch_scatter_available
from .bias import window_bias
from .synthetic import synthetic_scene
from .windows import local_windows

BACKENDS = ("auto", "sparse", "scatter", "torch")

#: fp32 relative error allowed before timing (a naive fp32 implementation drifts about 1e-6 here).
CHECK_TOLERANCE = 1e-4


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(args, dtype=torch.float32):
    scene = synthetic_scene(args.batch_size, args.queries, config=args.config, seed=0)
    win = local_windows(scene.layout, scene.bev_pos, scene.cam_pos, args.bev_window, args.cam_window)
    gen = torch.Generator().manual_seed(0)
    b, h, q, k, d = args.batch_size, args.heads, args.queries, scene.layout.num_keys, args.head_dim
    tensors = [torch.randn(b, h, q, d, generator=gen), torch.randn(b, h, k, d, generator=gen),
               torch.randn(b, h, k, d, generator=gen)]
    weights = [torch.rand(b, q, generator=gen), torch.rand(b, q, generator=gen)]
    q_, k_, v_ = (t.to(dtype).requires_grad_() for t in tensors)
    wb, wc = (w.requires_grad_() for w in weights)
    return win, q_, k_, v_, wb, wc


def _step(variant, win, q, k, v, wb, wc, grad):
    if variant == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    elif variant == "dense-bias":
        dense = window_bias(win, wb, wc).to_dense().unsqueeze(1).to(q.dtype)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    else:
        out = sparse_bias_attention(q, k, v, window_bias(win, wb, wc), backend=variant.split("-", 1)[1])
    if grad is not None:
        out.backward(grad)
    return out


def _grads(out, grad, tensors):
    got = [out.detach()] + list(torch.autograd.grad(out, tensors, grad))
    return got


def _check_all(args, win, q, k, v, wb, wc, grad) -> Dict:
    """Max relative error (output and every gradient) of each variant against the dense reference."""
    tensors = (q, k, v, wb, wc)
    want = _grads(dense_bias_attention(q, k, v, window_bias(win, wb, wc).to_dense()), grad, tensors)
    errors = {}
    for variant in args.check_variants.split(","):
        got = _grads(_step(variant, win, q, k, v, wb, wc, None), grad, tensors)
        errors[variant] = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30)) for a, b in zip(got, want))
    return errors


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def _time_all(args, names, win, q, k, v, wb, wc, grad) -> Dict:
    """Interleaved timing of every variant in this one process: per repeat, each variant once (after one
    warm-up round), so that drifts of the machine hit all variants alike."""
    times = {name: [] for name in names}
    for i in range(args.repeats + 1):
        for name in names:
            start = time.perf_counter()
            _step(name, win, q, k, v, wb, wc, grad if args.backward else None)
            elapsed = time.perf_counter() - start
            _clear_grads((q, k, v, wb, wc))
            if i:
                times[name].append(elapsed)
    ratios = {name: statistics.median(t / b for t, b in zip(times[name], times["sdpa"])) for name in names}
    return {name: {"time_s": statistics.median(times[name]), "time_ratio": ratios[name]} for name in names}


def _worker(args) -> Dict:
    torch.manual_seed(0)
    win, q, k, v, wb, wc = _inputs(args)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    if args.mode == "check":                  # exactness against the dense reference
        return _check_all(args, win, q, k, v, wb, wc, grad)
    if args.mode == "time":
        return _time_all(args, args.check_variants.split(","), win, q, k, v, wb, wc, grad)
    rss_setup = _rss_mib()                    # memory: one warm-up step and one measured step, fresh process
    for _ in range(2):
        _step(args.worker, win, q, k, v, wb, wc, grad if args.backward else None)
        _clear_grads((q, k, v, wb, wc))
    chosen = select_backend(q, window_bias(win, wb, wc))[0] if args.worker == "sparse-auto" else ""
    return {"variant": args.worker, "peak_rss_mib": _peak_rss_mib(), "setup_rss_mib": rss_setup,
            "chosen": chosen, "nnz": win.nnz}


def _run(args, mode: str, variant: str = "-", names=()) -> Dict:
    cmd = [sys.executable, "-m", "sparse_bias.benchmark", "--worker", variant, "--mode", mode,
           "--queries", str(args.queries),
           "--config", args.config, "--batch-size", str(args.batch_size), "--heads", str(args.heads),
           "--head-dim", str(args.head_dim), "--bev-window", str(args.bev_window),
           "--cam-window", str(args.cam_window), "--repeats", str(args.repeats)]
    if not args.backward:
        cmd.append("--forward-only")
    if names:
        cmd += ["--check-variants", ",".join(names)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"benchmark worker ({mode} {variant}) failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def variants() -> List[str]:
    names = ["sdpa"] + [f"sparse-{b}" for b in BACKENDS if b != "scatter" or torch_scatter_available()]
    return names + ["dense-bias"]


def format_table(rows: List[Dict]) -> str:
    base = next(r for r in rows if r["variant"] == "sdpa")
    lines = [f"{'variant':20s} {'time [s]':>9s} {'x sdpa':>7s} {'peak RSS [MiB]':>15s} {'x sdpa':>7s} "
             f"{'extra over inputs [MiB]':>24s} {'max rel err':>12s}"]
    base_extra = base["peak_rss_mib"] - base["setup_rss_mib"]
    for r in rows:
        extra = r["peak_rss_mib"] - r["setup_rss_mib"]
        err = "-" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        name = r["variant"] + (f" ({r['chosen']})" if r.get("chosen") else "")
        lines.append(f"{name:20s} {r['time_s']:9.3f} {r['time_ratio']:7.2f} {r['peak_rss_mib']:15.0f} "
                     f"{r['peak_rss_mib'] / base['peak_rss_mib']:7.2f} {extra:17.0f} ({extra / base_extra:4.2f}x) "
                     f"{err:>12s}")
    return "\n".join(lines)


def main(argv=None) -> List[Dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="fusion", choices=["fusion", "small"])
    parser.add_argument("--queries", type=int, default=900)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--bev-window", type=int, default=15)
    parser.add_argument("--cam-window", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forward-only", dest="backward", action="store_false")
    parser.add_argument("--no-check", dest="check", action="store_false")
    parser.add_argument("--variants", nargs="*", default=None, help=f"subset of {variants()}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run, used by the tests)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="time", choices=["check", "time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--check-variants", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.queries, args.batch_size, args.heads, args.repeats = "small", 32, 1, 2, 1
    if args.worker:
        print(json.dumps(_worker(args)))
        return []
    print(f"sparse_bias benchmark: {args.config} layout, B={args.batch_size}, H={args.heads}, D={args.head_dim}, "
          f"Q={args.queries}, windows {args.bev_window}/{args.cam_window}, fp32, "
          f"{'forward + backward' if args.backward else 'forward'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved repeats; peak RSS from a fresh process per variant")
    names = args.variants or variants()
    if "sdpa" not in names:
        names = ["sdpa"] + names
    errors = {}
    if args.check:
        errors = _run(args, "check", names=[n for n in names if n != "sdpa"])
        print("  exactness vs the dense reference (max relative error, output and all gradients): "
              + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()), flush=True)
        bad = {k: v for k, v in errors.items() if not v < CHECK_TOLERANCE}
        if bad:
            raise RuntimeError(f"variants disagree with the dense reference: {bad}")
    timing = _run(args, "time", names=names)
    print("  timed (interleaved, one process): " + ", ".join(f"{k} {v['time_s']:.3f} s" for k, v in timing.items()),
          flush=True)
    rows = []
    for name in names:
        row = _run(args, "memory", name)
        row.update(timing[name], max_rel_error=errors.get(name))
        rows.append(row)
        print(f"  memory of {name}: peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
