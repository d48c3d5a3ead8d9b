"""Benchmark sparse-bias attention against unbiased SDPA and the dense-bias version.

    python -m sparse_bias.tools.benchmark [--queries 900] [--config fusion] [--repeats 5] [--quick]

One process checks every variant's output and gradients (q, k, v and the AQR weights behind the bias)
against the dense reference on the same inputs. One process then times the forward and the forward +
backward of all variants interleaved (per repeat, each variant and pass once, after a warm-up round), so the
ratios to unbiased SDPA (the floor) are measured side by side; ``dense-bias`` is timed after the others (its
multi-GB buffers would slow down what runs next). Finally every variant runs one warm-up and one measured
step in a fresh process of its own for its peak RSS (forward + backward, and forward only).

Variants: ``sdpa`` (no bias, no dropout: the floor), ``sparse-<backend>`` (``auto`` and each backend),
``dense-bias`` (``scaled_dot_product_attention`` with the materialised ``[B, 1, Q, K]`` bias -- the dense version).
With ``--dropout P`` every variant but ``sdpa`` runs attention dropout P, and ``sdpa-dropout`` (SDPA with
dropout) is added; the sparse variants are checked against the dense reference with the same dropout seed.
"""
from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

from ..attention import dense_bias_attention, select_backend, sparse_bias_attention
from ..backends import BACKENDS as REGISTRY, backend_names, torch_scatter_available
from ..bias import window_bias
from ..windows import local_windows
from .cli import (Parser, odd_positive_int, positive_float, positive_int, probability, progress_bar,
                  report_to_parent, run_cli, run_worker, worker_progress, write_json)
from .estimates import PROCESS_START_S, Estimate, step_gb, step_seconds
from .memory import dense_bias_gb
from .synthetic import CMT_CONFIGS, synthetic_scene

__all__ = ["BACKENDS", "DTYPES", "CHECK_TOLERANCE", "LOW_PRECISION_RATIO", "DROPOUT_SEED", "ALL_VARIANTS", "SWEEP",
           "QUICK_SWEEP", "variants", "format_table", "phase_estimates", "compare", "sweep", "sweep_markdown", "main",
           "cli"]

#: ``backend=`` values benchmarked: "auto" and every registered correction backend (`sparse_bias.backends`)
BACKENDS = ("auto",) + backend_names("correction")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: fp32 relative error allowed before timing (a naive fp32 implementation drifts about 1e-6 here).
CHECK_TOLERANCE = 1e-4
#: bfloat16 / float16: error allowed, as a multiple of the drift of the dense reference at the same precision.
LOW_PRECISION_RATIO = 2.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """This process's peak RSS: ``VmHWM`` (``ru_maxrss`` would carry a parent's peak into a fresh worker)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _inputs(args):
    dtype = DTYPES[args.dtype]
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


#: the dropout seed of the sparse variants and the reference (fixed, so the exactness check can compare them)
DROPOUT_SEED = 1234


def _step(variant, inputs, grad, dropout=0.0):
    """One forward (and backward when ``grad`` is given) of a variant; ``sdpa`` is always the dropout-free floor."""
    win, q, k, v, wb, wc = inputs
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if variant == "sdpa":
        out = sdpa(q, k, v)
    elif variant == "sdpa-dropout":
        out = sdpa(q, k, v, dropout_p=dropout)
    elif variant == "dense-bias":
        dense = window_bias(win, wb, wc).to_dense().unsqueeze(1).to(q.dtype)
        out = sdpa(q, k, v, attn_mask=dense, dropout_p=dropout)
    else:
        out = sparse_bias_attention(q, k, v, window_bias(win, wb, wc), backend=variant.split("-", 1)[1],
                                    dropout_p=dropout, dropout_seed=DROPOUT_SEED)
    if grad is not None:
        out.backward(grad)
    return out


def _grads(out, grad, tensors):
    got = [out.detach()] + list(torch.autograd.grad(out, tensors, grad))
    return got


def _check_all(args, win, q, k, v, wb, wc, grad) -> Dict:
    """Max relative error (output and every gradient) of each variant against the dense reference.

    float32: against the dense reference in float32. bfloat16 / float16: against the dense reference in float64
    on the same (rounded) inputs, divided by how far the dense reference at the input precision drifts from it
    -- a ratio, so ``CHECK_TOLERANCE`` does not apply; ``LOW_PRECISION_RATIO`` does.
    """
    tensors = (q, k, v, wb, wc)
    drop = dict(dropout_p=args.dropout, dropout_seed=DROPOUT_SEED)
    if q.dtype == torch.float32:
        want = _grads(dense_bias_attention(q, k, v, window_bias(win, wb, wc).to_dense(), **drop), grad, tensors)
        scale = None
    else:
        exact = [t.detach().double().requires_grad_() for t in tensors]
        want = _grads(dense_bias_attention(*exact[:3], window_bias(win, *exact[3:]).to_dense(), **drop), grad.double(),
                      exact)
        naive = _grads(dense_bias_attention(q, k, v, window_bias(win, wb, wc).to_dense().to(q.dtype), **drop), grad,
                       tensors)
        scale = [float((a.double() - b).abs().max()) for a, b in zip(naive, want)]
    errors = {}
    checked = [v for v in args.check_variants.split(",")
               if not (args.dropout > 0 and not v.startswith("sparse-"))]   # PyTorch's dropout: other decisions
    for variant in worker_progress(checked):
        got = _grads(_step(variant, (win, q, k, v, wb, wc), None, args.dropout), grad, tensors)
        if scale is None:
            errors[variant] = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
                                  for a, b in zip(got, want))
        else:
            errors[variant] = max(float((a.double() - b).abs().max()) / max(s, 1e-12)
                                  for a, b, s in zip(got, want, scale))
    return errors


def _clear_grads(tensors):
    for t in tensors:
        t.grad = None


def _time_all(args, names, inputs, grad) -> Dict:
    """Interleaved timing of every variant in this one process: per repeat, each variant once per pass (forward,
    forward + backward; after one warm-up round), so that drifts of the machine hit all variants alike.

    ``dense-bias`` is timed after the others, on its own: its multi-GB buffers, freed at the end of each step,
    would slow down whatever runs next and bias the interleaved ratios.
    """
    passes = ("forward", "forward+backward") if args.backward else ("forward",)
    times = {(name, p): [] for name in names for p in passes}
    light = [n for n in names if n != "dense-bias"]
    plan = [(i, name, p) for group in (light, [n for n in names if n == "dense-bias"])
            for i in range(args.repeats + 1) for name in group for p in passes]
    for i, name, p in worker_progress(plan):
        start = time.perf_counter()
        _step(name, inputs, grad if p == "forward+backward" else None, args.dropout)
        elapsed = time.perf_counter() - start
        _clear_grads(inputs[1:])
        if i:
            times[(name, p)].append(elapsed)
    out = {name: {} for name in names}
    for name in names:
        for p in passes:
            key = "" if p == "forward+backward" or not args.backward else "fwd_"
            median = statistics.median(times[(name, p)])
            # the ratio of the two medians the table prints (recomputable from them), not a median of ratios
            out[name].update({f"{key}time_s": median, f"{key}time_ratio": median / statistics.median(times[("sdpa", p)])})
    return out


def _worker(args) -> Dict:
    torch.manual_seed(0)
    win, q, k, v, wb, wc = _inputs(args)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    if args.mode == "check":                  # exactness against the dense reference
        return _check_all(args, win, q, k, v, wb, wc, grad)
    if args.mode == "time":
        return _time_all(args, args.check_variants.split(","), (win, q, k, v, wb, wc), grad)
    rss_setup = _rss_mib()                    # memory: one warm-up step and one measured step, fresh process
    for _ in range(2):
        _step(args.worker, (win, q, k, v, wb, wc), grad if args.backward else None, args.dropout)
        _clear_grads((q, k, v, wb, wc))
    chosen = select_backend(q, window_bias(win, wb, wc))[0] if args.worker == "sparse-auto" else ""
    return {"variant": args.worker, "peak_rss_mib": _peak_rss_mib(), "setup_rss_mib": rss_setup,
            "chosen": chosen, "nnz": win.nnz}


def _run(args, mode: str, variant: str = "-", names=(), bar=None) -> Dict:
    argv = ["--worker", variant, "--mode", mode, "--queries", str(args.queries),
            "--config", args.config, "--batch-size", str(args.batch_size), "--heads", str(args.heads),
            "--head-dim", str(args.head_dim), "--bev-window", str(args.bev_window),
            "--cam-window", str(args.cam_window), "--repeats", str(args.repeats), "--dtype", args.dtype,
            "--dropout", str(args.dropout)]
    if not args.backward:
        argv.append("--forward-only")
    if names:
        argv += ["--check-variants", ",".join(names)]
    return run_worker("sparse_bias.tools.benchmark", argv, f"benchmark worker ({mode} {variant})", bar=bar)


#: every variant name the command line accepts
ALL_VARIANTS = ["sdpa", "sdpa-dropout"] + [f"sparse-{b}" for b in BACKENDS] + ["dense-bias"]


def variants(dropout: float = 0.0) -> List[str]:
    """The variants of a run; with dropout, ``sdpa-dropout`` (PyTorch's SDPA with dropout) joins the floor."""
    names = ["sdpa"] + (["sdpa-dropout"] if dropout > 0 else [])
    names += [f"sparse-{b}" for b in BACKENDS if b == "auto" or REGISTRY[b].can_run("cpu", torch.float32)[0]]
    return names + ["dense-bias"]


def format_table(rows: List[Dict]) -> str:
    """Time (forward, and forward + backward when measured) and peak RSS of every variant, with ratios to SDPA."""
    base = next(r for r in rows if r["variant"] == "sdpa")
    both = "fwd_time_s" in base
    head = f"{'variant':20s} "
    if both:
        head += f"{'fwd [s]':>8s} {'x sdpa':>7s} {'fwd+bwd [s]':>12s} {'x sdpa':>7s} "
    else:
        head += f"{'time [s]':>9s} {'x sdpa':>7s} "
    lines = [head + f"{'peak RSS [MiB]':>15s} {'x sdpa':>7s} {'extra over inputs [MiB]':>24s} {'max rel err':>12s}"]
    base_extra = base["peak_rss_mib"] - base["setup_rss_mib"]
    for r in rows:
        extra = r["peak_rss_mib"] - r["setup_rss_mib"]
        err = "-" if r["max_rel_error"] is None else f"{r['max_rel_error']:.1e}"
        name = r["variant"] + (f" ({r['chosen']})" if r.get("chosen") else "")
        line = f"{name:20s} "
        if both:
            line += (f"{r['fwd_time_s']:8.3f} {r['fwd_time_ratio']:7.3f} {r['time_s']:12.3f} {r['time_ratio']:7.3f} ")
        else:
            line += f"{r['time_s']:9.3f} {r['time_ratio']:7.3f} "
        lines.append(line + f"{r['peak_rss_mib']:15.0f} {r['peak_rss_mib'] / base['peak_rss_mib']:7.3f} "
                     f"{extra:17.0f} ({extra / base_extra:4.2f}x) {err:>12s}")
    lines.append("x sdpa: the value on its left divided by sdpa's in the same column (times: the ratio of the two "
                 "medians, from the unrounded values)")
    if both and "fwd_peak_rss_mib" in base:
        lines.append("peak RSS of a forward-only step: " + ", ".join(
            f"{r['variant']} {r['fwd_peak_rss_mib']:.0f} MiB ({r['fwd_peak_rss_mib'] / base['fwd_peak_rss_mib']:.3f}x)"
            for r in rows))
    return "\n".join(lines)


def _parser() -> Parser:
    parser = Parser.for_tool("benchmark", __doc__)
    parser.add_argument("--config", default="fusion", quick="small", choices=["fusion", "small"],
                        help="CMT memory layout")
    parser.add_argument("--queries", type=positive_int, default=900, quick=32, help="object queries Q")
    parser.add_argument("--batch-size", type=positive_int, default=2, quick=1, help="batch size B")
    parser.add_argument("--heads", type=positive_int, default=8, quick=2, help="attention heads H")
    parser.add_argument("--head-dim", type=positive_int, default=32, help="head dim D")
    parser.add_argument("--bev-window", type=odd_positive_int, default=None,
                        help="BEV window size, odd (default: 15; 5 with --quick --sweep)")
    parser.add_argument("--cam-window", type=odd_positive_int, default=None,
                        help="camera window size, odd (default: 15; 5 with --quick --sweep)")
    parser.add_argument("--repeats", type=positive_int, default=5, quick=1,
                        help="timed repeats per variant (median), after a warm-up")
    parser.add_argument("--forward-only", dest="backward", action="store_false",
                        help="time the forward only (otherwise forward and forward + backward, side by side)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of q, k, v")
    parser.add_argument("--dropout", type=probability, default=0.0,
                        help="attention dropout in [0, 1) of every variant but sdpa, which stays the dropout-free "
                             "floor; adds sdpa-dropout")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the exactness check against the dense reference")
    parser.add_argument("--check-queries", type=positive_int, default=None,
                        help="check exactness with this many queries (same layout and windows) (default: all)")
    parser.add_argument("--variants", nargs="+", default=None, choices=ALL_VARIANTS, metavar="VARIANT",
                        help=f"subset of {ALL_VARIANTS} (default: all that run here)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a dry run, used by the tests)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (default: none)")
    parser.add_argument("--sweep", action="store_true",
                        help="sweep queries, window size and layout; writes CSV, JSON and PNG plots to --out")
    parser.add_argument("--out", default="bench_out", help="output folder of --sweep")
    parser.add_argument("--max-dense-gib", type=positive_float, default=16.0,
                        help="skip dense-bias where it would need more RAM than this (GB)")
    parser.add_worker_arguments(["check", "time", "memory"], default="time")
    parser.add_argument("--check-variants", default="", help=argparse.SUPPRESS)
    return parser


def _dense_gb(args) -> float:
    """RAM the dense-bias variant needs (for skipping, not reporting)."""
    return dense_bias_gb(args.batch_size, args.heads, args.queries, CMT_CONFIGS[args.config].layout.num_keys)


def _names(args) -> List[str]:
    """The variants `compare` runs: ``sdpa`` first, ``dense-bias`` only where it fits in ``--max-dense-gib``."""
    names = list(args.variants or variants(args.dropout))
    if "sdpa" not in names:
        names = ["sdpa"] + names
    if "dense-bias" in names and _dense_gb(args) > args.max_dense_gib:
        names.remove("dense-bias")
    return names


def phase_estimates(args, names: List[str]) -> Dict[str, Estimate]:
    """The rough cost (`sparse_bias.tools.estimates.Estimate`) of each phase of `compare` -- ``"check"`` (when
    ``args.check``), ``"time"``, ``"memory"`` -- for the variants ``names``, and of all of them, ``"total"``."""
    keys = CMT_CONFIGS[args.config].layout.num_keys
    dtype = DTYPES[args.dtype]
    size = dict(batch=args.batch_size, heads=args.heads, keys=keys, head_dim=args.head_dim)

    def secs(name, backward, queries=args.queries):
        return step_seconds(name, backward, queries=queries, dtype=dtype, **size)

    def gb(name, queries=args.queries):
        return step_gb(name, queries=queries, element_size=torch.empty((), dtype=dtype).element_size(), **size)
    passes = (False, True) if args.backward else (False,)
    peak = max(gb(n) for n in names)
    out = {}
    if args.check:
        cq = min(args.queries, args.check_queries) if args.check_queries else args.queries
        checked = [n for n in names if n != "sdpa"]
        reference = secs("dense-bias", True, cq) * (1 if dtype == torch.float32 else 3)   # + float64 and naive
        out["check"] = Estimate("exactness check", f"{len(checked)} variants and the dense reference at Q={cq}, "
                                "forward + backward", PROCESS_START_S + reference
                                + sum(secs(n, True, cq) for n in checked), gb("dense-bias", cq))
    steps = (args.repeats + 1) * len(names) * len(passes)
    out["time"] = Estimate("timing", f"{steps} steps: {len(names)} variants x {len(passes)} passes x "
                           f"(1 warm-up + {args.repeats} repeats)",
                           PROCESS_START_S + (args.repeats + 1) * sum(secs(n, p) for n in names for p in passes), peak)
    out["memory"] = Estimate("peak memory", f"{len(names) * len(passes)} fresh processes, one per variant and pass",
                             sum(PROCESS_START_S + 2 * secs(n, p) for n in names for p in passes), peak)
    out["total"] = Estimate("all phases", "", sum(e.seconds for e in out.values()),
                            max(e.gb for e in out.values()))
    return out


def compare(args, log=print) -> List[Dict]:
    """One configuration: exactness check, interleaved timing, fresh-process peak memory of every variant; each
    phase announced by its estimate (`phase_estimates`) and shown by a progress bar on stderr."""
    names = _names(args)
    if "dense-bias" in (args.variants or variants(args.dropout)) and "dense-bias" not in names:
        log(f"  dense-bias skipped: it needs about {_dense_gb(args):.0f} GB")
    estimates = phase_estimates(args, names)
    errors = {}
    if args.check:
        check_args = copy.copy(args)
        if args.check_queries:
            check_args.queries = min(args.queries, args.check_queries)
        log("  " + estimates["check"].line())
        with progress_bar(desc="exactness check", unit="variant", leave=False) as bar:
            errors = _run(check_args, "check", names=[n for n in names if n != "sdpa"], bar=bar)
        what = ("max relative error" if args.dtype == "float32" else
                f"max error / the {args.dtype} dense reference's error, against float64")
        log(f"  exactness vs the dense reference at Q={check_args.queries} ({what}, output and all gradients): "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
        limit = CHECK_TOLERANCE if args.dtype == "float32" else LOW_PRECISION_RATIO
        bad = {k: v for k, v in errors.items() if not v < limit}
        if bad:
            raise RuntimeError(f"variants disagree with the dense reference: {bad}")
    log("  " + estimates["time"].line())
    with progress_bar(desc="timing (interleaved)", unit="step", leave=False) as bar:
        timing = _run(args, "time", names=names, bar=bar)
    log("  timed (interleaved, one process): " + ", ".join(f"{k} {v['time_s']:.3f} s" for k, v in timing.items()))
    rows = []
    log("  " + estimates["memory"].line())
    bar = progress_bar(total=len(names), desc="peak memory (a process per variant)", unit="variant", leave=False)
    for name in names:
        bar.set_postfix_str(name)
        row = _run(args, "memory", name)
        row.update(timing[name], max_rel_error=errors.get(name))
        if args.backward:                       # the forward-only step's peak too (inference)
            fwd_args = copy.copy(args)
            fwd_args.backward = False
            fwd = _run(fwd_args, "memory", name)
            row.update(fwd_peak_rss_mib=fwd["peak_rss_mib"], fwd_setup_rss_mib=fwd["setup_rss_mib"])
        rows.append(row)
        bar.clear()
        log(f"  memory of {name}: peak RSS {row['peak_rss_mib']:.0f} MiB")
        bar.set_postfix_str("")
        bar.update()
        bar.refresh()
    bar.close()
    return rows


#: The sweep: (swept parameter, values); the other parameters stay at the CMT fusion defaults.
SWEEP = [("queries", [300, 900, 1800]), ("window", [5, 15, 25]), ("layout", ["small", "fusion"])]
#: The same, tiny, for ``--quick`` (a dry run).
QUICK_SWEEP = [("queries", [16, 32]), ("window", [5]), ("layout", ["small"])]


def sweep(args, spec=SWEEP) -> List[Dict]:
    """Run `compare` over ``spec`` (``[(parameter, values)]``), forward and forward + backward; write CSV,
    JSON, a Markdown table and plots to ``args.out``."""
    points = []
    for param, values in spec:
        for value in values:
            point = {"queries": args.queries, "window": args.bev_window, "layout": args.config}
            point[param] = value
            points.append((param, point))
    unique = {tuple(sorted(p.items())): p for _, p in points}
    os.makedirs(args.out, exist_ok=True)
    results = {}
    point_args = {}
    for key, point in unique.items():
        run_args = point_args[key] = copy.copy(args)
        run_args.queries, run_args.bev_window, run_args.cam_window = point["queries"], point["window"], point["window"]
        run_args.config, run_args.backward = point["layout"], True
    estimates = [phase_estimates(a, _names(a))["total"] for a in point_args.values()]
    print(Estimate("sweep", f"{len(unique)} points", sum(e.seconds for e in estimates),
                   max(e.gb for e in estimates)).line(), flush=True)
    bar = progress_bar(total=len(unique), desc="benchmark sweep", unit="point")
    for key, point in unique.items():
        run_args = point_args[key]
        bar.set_postfix_str(str(point))
        rows = compare(run_args, log=lambda m: bar.write(m, file=sys.stdout))   # fwd and fwd+bwd side by side
        for pass_ in ("forward", "forward+backward"):
            for row in rows:
                out = dict(row, **point, pass_=pass_)
                if pass_ == "forward":
                    out.update(time_s=row["fwd_time_s"], time_ratio=row["fwd_time_ratio"],
                               peak_rss_mib=row["fwd_peak_rss_mib"], setup_rss_mib=row["fwd_setup_rss_mib"])
                results.setdefault(key, []).append(out)
        bar.update()
    bar.close()
    rows = []
    for param, point in points:
        for row in results[tuple(sorted(point.items()))]:
            rows.append(dict(row, swept=param))
    _write_sweep(args.out, rows)
    return rows


def sweep_markdown(rows: List[Dict]) -> str:
    """A Markdown table per swept parameter: time and peak RSS of each variant and their ratios to SDPA."""
    lines = []
    for param in dict.fromkeys(r["swept"] for r in rows):
        sel = [r for r in rows if r["swept"] == param]
        lines += [f"### Sweep over {param}", "",
                  f"| {param} | pass | variant | time [s] | x sdpa | peak RSS [MiB] | x sdpa | max rel err |",
                  "|---|---|---|---|---|---|---|---|"]
        base = {(r[param], r["pass_"]): r["peak_rss_mib"] for r in sel if r["variant"] == "sdpa"}
        for r in sel:
            err = "-" if r.get("max_rel_error") is None else f"{r['max_rel_error']:.1e}"
            name = r["variant"] + (f" ({r['chosen']})" if r.get("chosen") else "")
            lines.append(f"| {r[param]} | {r['pass_']} | {name} | {r['time_s']:.3f} | {r['time_ratio']:.3f} | "
                         f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base[(r[param], r['pass_'])]:.3f} | {err} |")
        lines.append("")
    return "\n".join(lines)


def _write_sweep(out: str, rows: List[Dict]) -> None:
    import csv

    fields = ["swept", "layout", "queries", "window", "pass_", "variant", "chosen", "time_s", "time_ratio",
              "peak_rss_mib", "setup_rss_mib", "max_rel_error", "nnz"]
    with open(os.path.join(out, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    write_json(os.path.join(out, "sweep.json"), rows)
    with open(os.path.join(out, "sweep.md"), "w") as f:
        f.write(sweep_markdown(rows))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    for param in dict.fromkeys(r["swept"] for r in rows):
        sel = [r for r in rows if r["swept"] == param]
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
        for color, variant in enumerate(dict.fromkeys(r["variant"] for r in sel)):
            for pass_, style in (("forward+backward", "-o"), ("forward", "--x")):
                pts = [r for r in sel if r["variant"] == variant and r["pass_"] == pass_]
                if not pts:
                    continue
                xs = [str(r[param]) for r in pts]
                label = f"{variant} ({'fwd+bwd' if pass_ == 'forward+backward' else 'fwd'})"
                axes[0, 0].plot(xs, [r["time_s"] for r in pts], style, color=f"C{color}", label=label)
                axes[0, 1].plot(xs, [r["time_ratio"] for r in pts], style, color=f"C{color}", label=label)
                base = {r[param]: r["peak_rss_mib"] for r in sel if r["variant"] == "sdpa" and r["pass_"] == pass_}
                axes[1, 0].plot(xs, [r["peak_rss_mib"] for r in pts], style, color=f"C{color}", label=label)
                axes[1, 1].plot(xs, [r["peak_rss_mib"] / base[r[param]] for r in pts], style, color=f"C{color}", label=label)
        for ax, title in zip(axes.flat, ["time [s]", "time / unbiased SDPA", "peak RSS [MiB]",
                                         "peak RSS / unbiased SDPA"]):
            ax.set_title(title)
            ax.set_xlabel(param)
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0, 1].legend(fontsize=7)
        fig.suptitle(f"sparse_bias benchmark: sweep over {param}")
        fig.savefig(os.path.join(out, f"sweep_{param}.png"), dpi=90)
        plt.close(fig)


def parse_args(argv=None, parser: Optional[Parser] = None) -> argparse.Namespace:
    """The command line parsed, every default filled in (the window sizes depend on ``--quick --sweep``)."""
    args = (parser or _parser()).parse_args(argv)
    for name in ("bev_window", "cam_window"):
        if getattr(args, name) is None:
            setattr(args, name, 5 if args.quick and args.sweep else 15)
    return args


def main(argv=None) -> List[Dict]:
    parser = _parser()
    args = parse_args(argv, parser)
    if args.variants and "sparse-scatter" in args.variants and not torch_scatter_available():
        parser.error("--variants sparse-scatter: torch-scatter is not installed")
    if args.variants and "sdpa-dropout" in args.variants and args.dropout == 0:
        parser.error("--variants sdpa-dropout needs --dropout > 0")
    if args.worker:
        report_to_parent(_worker(args))
        return []
    if args.sweep:
        rows = sweep(args, QUICK_SWEEP if args.quick else SWEEP)
        print(f"sweep: {len(rows)} rows; CSV, JSON and plots in {args.out}")
        return rows
    print(f"sparse_bias benchmark: {args.config} layout, B={args.batch_size}, H={args.heads}, D={args.head_dim}, "
          f"Q={args.queries}, windows {args.bev_window}/{args.cam_window}, {args.dtype}, "
          + (f"dropout {args.dropout} (sdpa without), " if args.dropout else "")
          + f"{'forward + backward' if args.backward else 'forward'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats} interleaved repeats; peak RSS from a fresh "
          "process per variant")
    rows = compare(args, log=lambda m: print(m, flush=True))
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows)
    return rows


def cli() -> int:
    """Console entry point ``sparse-bias-benchmark``."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
