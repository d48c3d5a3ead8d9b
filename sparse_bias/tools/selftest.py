"""Self-test on your device: exactness of every backend, then timings against SDPA / dense bias / FlexAttention.

    python -m sparse_bias.tools.selftest                      # the best device here (cuda:0 when there is one)
    python -m sparse_bias.tools.selftest --device cuda:1 --json selftest.json
    python -m sparse_bias.tools.selftest --quick              # small sizes everywhere (what the test suite runs)

Part 1 (exactness): for every backend that can run on the device, every dtype (float32, bfloat16, float16),
and each case -- shared bias, per-head bias, key padding, dropout with a fixed seed, concentrated attention (windows
holding 90 % of the mass, weights of +-5 of both signs: where an additive correction would cancel), and
``window_attention`` plain, with padding and with dropout -- output and gradients (q, k, v, bias values) against the dense reference in
float64, within the bound of `sparse_bias._core.precision` (twice the error of the naive dense computation in the same
dtype plus the roundings only the library's path makes). One PASS/FAIL line per check.
Part 2 (timing): forward and forward + backward at the CMT fusion shape (or ``--queries`` / ``--window`` /
``--layout``) of unbiased SDPA (flash on a GPU), ``sparse_bias_attention`` (auto backend), the dense-bias
SDPA (when it fits) and FlexAttention with a ``score_mod`` (where it runs). Exits 1 when any check fails.

The run starts with an estimate of its time and peak memory (`sparse_bias.tools.estimates`; on a CPU the full run
needs about 11.5 GB of RAM for the dense-bias timing, ``--quick`` about 5 GB), and each part with its own; progress
goes to stderr.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .._core.call import Call
from .._core.concentrated import concentrated_qk
from .._core.masks import additive_mask
from .._core.ops import SparseBiasAttention, WindowAttention
from .._core.precision import tolerance
from .._core.reference import dense_attention, dense_window_attention
from .._core.selfcheck import self_check_results
from ..attention import sparse_bias_attention
from ..backends import backend_candidates
from ..bias import SparseBias, window_bias
from ..flex import flex_score_mod
from ..windows import local_windows
from .cli import Parser, odd_positive_int, positive_int, progress_bar, run_cli, write_json
from .estimates import Estimate, step_gb, step_seconds
from .memory import available_gib, dense_bias_gb
from .synthetic import CMT_CONFIGS, synthetic_scene

__all__ = ["selftest", "main", "cli"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CASES = ("shared bias", "per-head bias", "key padding", "dropout", "concentrated")
WINDOW_CASES = ("window", "window + padding", "window + dropout")


def _best_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _problem(device, quick: bool):
    """Inputs in float64: a CMT-like small layout, 2 batch elements, 4 heads, head dim 32."""
    scene = synthetic_scene(2, 24 if quick else 64, config="small", seed=3)
    layout = scene.layout
    win = local_windows(layout, scene.bev_pos, scene.cam_pos, 5, 5)
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, win.num_queries, 32, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 4, layout.num_keys, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    wb, wc = (2 * torch.rand(2, win.num_queries, 4, generator=gen, dtype=torch.float64) - 1 for _ in range(2))
    kpm = torch.zeros(2, layout.num_keys, dtype=torch.bool)
    kpm[1, -layout.num_keys // 5:] = True
    grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
    # a trained detector's regime: attention concentrated in the windows (share 0.9), weights of +-5, both signs
    qc, kc = concentrated_qk(win, 4, 32, 0.9, generator=gen)
    wbc, wcc = (5 * torch.where(torch.rand(2, win.num_queries, 4, generator=gen) < 0.5, -1.0, 1.0).double()
                * (0.8 + 0.2 * torch.rand(2, win.num_queries, 4, generator=gen, dtype=torch.float64)) for _ in range(2))
    return dict(win=win.to(device), q=q, k=k, v=v, wb=wb, wc=wc, kpm=kpm.to(device), grad=grad,
                concentrated=dict(q=qc, k=kc, wb=wbc, wc=wcc))


def _evaluate(op, backend, case, prob, device, dtype):
    """Output and gradients; ``backend`` None = the dense reference."""
    win = prob["win"]
    src = dict(prob, **prob["concentrated"]) if case == "concentrated" else prob
    q, k, v, wb, wc = (src[n].to(device, dtype).requires_grad_() for n in ("q", "k", "v", "wb", "wc"))
    values = window_bias(win, wb, wc).values
    if case == "shared bias":
        values = values.mean(1)
    padded = case in ("key padding", "window + padding")
    kpm = prob["kpm"] if padded else None
    dropout_p, seed = (0.2, 11) if case in ("dropout", "window + dropout") else (0.0, 0)
    call = Call.of(q, q.shape[-1] ** -0.5, additive_mask(q, k, kpm, None), dropout_p, seed)
    if backend is None:
        out = (dense_window_attention(q, k, v, win, SparseBias(win, values), call) if op == "window"
               else dense_attention(q, k, v, SparseBias(win, values).to_dense(), call))
    else:
        function = WindowAttention if op == "window" else SparseBiasAttention
        out = function.apply(q, k, v, values, win.entries().as_args(), call, backend)
    grads = torch.autograd.grad(out, (q, k, v, wb, wc), prob["grad"].to(device, dtype))
    return [t.detach().double().cpu() for t in (out,) + grads]


def _check(op, backend, case, prob, device, dtype, refs) -> Dict:
    key = (op, case)
    if (key, "exact") not in refs:
        refs[(key, "exact")] = _evaluate(op, None, case, prob, device, torch.float64)
    if (key, dtype) not in refs:
        refs[(key, dtype)] = _evaluate(op, None, case, prob, device, dtype)
    exact, naive = refs[(key, "exact")], refs[(key, dtype)]
    row = dict(op=op, backend=backend, dtype=str(dtype).replace("torch.", ""), case=case, passed=True,
               worst="", rel_err=0.0, tolerance=0.0, detail="")
    try:
        got = _evaluate(op, backend, case, prob, device, dtype)
    except Exception as exc:  # noqa: BLE001 - a backend that raises fails its check
        row.update(passed=False, detail=f"{type(exc).__name__}: {exc}")
        return row
    worst = -1.0
    for name, e, n, g in zip(("out", "dq", "dk", "dv", "dw_bev", "dw_cam"), exact, naive, got):
        size = max(float(e.abs().max()), 1e-30)
        err = float((g - e).abs().max())
        tol = tolerance(float((n - e).abs().max()), size, dtype)      # sparse_bias._core.precision
        ratio = err / tol if err == err else float("inf")        # NaN fails
        if ratio > worst:
            worst = ratio
            row.update(worst=name, rel_err=err / size, tolerance=tol / size)
    if worst > 1:
        row.update(passed=False, detail=f"{row['worst']}: error {row['rel_err']:.2e} > tolerance "
                                        f"{row['tolerance']:.2e} (relative to its largest value)")
    return row


#: seconds of one exactness check on the reference machine (2 CPU threads), full and ``quick`` problem: 96 checks
#: of ``python -m sparse_bias.tools.selftest --device cpu --no-timing [--quick]`` took 95 s and 75 s of CPU time
CHECK_SECONDS = {False: 1.0, True: 0.8}
#: peak RAM (GB) of the exactness checks on a CPU, measured the same way (4.5 GB full, 4.1 GB quick, all three
#: dtypes: the float64 dense references of every case); their problem has a fixed size
CHECK_GB = 4.6


def _plan(device, dtypes) -> List[tuple]:
    """The exactness checks: ``(op, backend, case, dtype)`` for every backend that runs on ``device``."""
    plan = []
    for op, cases in (("correction", CASES), ("window", WINDOW_CASES)):
        for dtype in dtypes:
            runnable = [n for n, ok, _ in backend_candidates(device, dtype, op=op) if ok]
            plan += [(op, name, case, dtype) for name in runnable for case in cases]
    return plan


def _checks(device, dtypes, quick, progress, log) -> List[Dict]:
    plan = _plan(device, dtypes)
    cpu = device.type == "cpu"
    log(Estimate("exactness", f"{len(plan)} checks: every backend x {len(dtypes)} dtypes x "
                 f"{len(CASES) + len(WINDOW_CASES)} cases against float64 references",
                 len(plan) * CHECK_SECONDS[quick] if cpu else None, CHECK_GB if cpu else None).line())
    prob = _problem(device, quick)
    rows, refs = [], {}
    with progress_bar(plan, desc="exactness", unit="check", enabled=progress, leave=False) as bar:
        for op, name, case, dtype in bar:
            row = _check(op, name, case, prob, device, dtype, refs)
            rows.append(row)
            with bar.external_write_mode(file=sys.stderr):
                log(_check_line(row))
    return rows


def _check_line(row) -> str:
    status = "PASS" if row["passed"] else "FAIL"
    what = f"{row['op']:10s} {row['backend']:8s} {row['dtype']:9s} {row['case']:16s}"
    if row["passed"]:
        return f"{status}  {what} worst {row['worst']}: {row['rel_err']:.1e} (tolerance {row['tolerance']:.1e})"
    return f"{status}  {what} {row['detail']}"


# ---- timing -----------------------------------------------------------------------------------------

def _timed(step, device, repeats, tick=lambda: None) -> Dict:
    step()                                                                # warm-up (and compilation)
    tick()
    times, peak = [], None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        tick()
    return dict(time_ms=statistics.median(times) * 1e3, peak_mib=peak)


def _dense_need_and_free(device, queries: int, keys: int):
    """Bytes the dense-bias variant of `_timing` needs, and the bytes free on ``device`` (it runs below 80 %)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        gib = available_gib()
        free = float("inf") if gib is None else gib * 1e9
    return dense_bias_gb(2, 8, queries, keys) * 1e9, free


def _timing_names(device, queries: int, keys: int) -> List[str]:
    """The variants `_timing` runs (dense-bias where it fits, FlexAttention where this torch has it)."""
    need, free = _dense_need_and_free(device, queries, keys)
    names = ["sdpa", "sparse-auto"] + (["dense-bias"] if need < free * 0.8 else [])
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:  # pragma: no cover - older torch
        return names
    return names + ["flex"]


def _timing_estimate(device, dtype, queries: int, keys: int, names: List[str], repeats: int) -> Estimate:
    """Rough time (CPU only) and peak memory of `_timing` (`sparse_bias.tools.estimates`); FlexAttention counts at
    the dense-bias cost (unfused, it materialises the scores too; where it does not run it stops at once)."""
    size = dict(batch=2, heads=8, queries=queries, keys=keys, head_dim=32)
    gb = max(step_gb("dense-bias" if n == "flex" else n, element_size=torch.empty((), dtype=dtype).element_size(),
                     **size) for n in names)
    seconds = None
    if device.type == "cpu":
        seconds = (repeats + 1) * sum(step_seconds("dense-bias" if n == "flex" else n, bwd, dtype=dtype, **size)
                                      for n in names for bwd in (False, True))
    return Estimate("timing", f"{len(names) * 2 * (repeats + 1)} steps: {len(names)} variants x 2 passes x "
                    f"(1 warm-up + {repeats} repeats)", seconds, gb, "RAM" if device.type == "cpu" else "GPU memory")


def _timing(device, dtype, queries, window, layout, repeats, progress, quick, log=print) -> List[Dict]:
    scene = synthetic_scene(2, queries, config=layout, seed=0, device=device)
    win = local_windows(scene.layout, scene.bev_pos, scene.cam_pos, window, window)
    gen = torch.Generator(device=device).manual_seed(0)
    nk = scene.layout.num_keys
    heads, dim = (8, 32)
    q, k, v = (torch.randn(2, heads, n, dim, generator=gen, device=device).to(dtype).requires_grad_()
               for n in (queries, nk, nk))
    wb, wc = (torch.rand(2, queries, generator=gen, device=device).requires_grad_() for _ in range(2))
    dense_bytes, free = _dense_need_and_free(device, queries, nk)
    variants = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
        "sparse-auto": lambda: sparse_bias_attention(q, k, v, window_bias(win, wb, wc)),
    }
    if dense_bytes < free * 0.8:
        variants["dense-bias"] = lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=window_bias(win, wb, wc).to_dense().unsqueeze(1).to(dtype))
    flex = None
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = flex_attention if device.type == "cpu" else torch.compile(flex_attention)
    except ImportError:  # pragma: no cover - older torch
        pass
    if flex is not None:
        mod = flex_score_mod(scene.layout, scene.bev_pos, scene.cam_pos, window, window, wb, wc)
        variants["flex"] = lambda: flex(q, k, v, score_mod=mod)
    plan = [(n, bwd) for n in variants for bwd in (False, True)]
    log(_timing_estimate(device, dtype, queries, nk, list(variants), repeats).line())
    rows = []
    bar = progress_bar(total=len(plan) * (repeats + 1), desc="timing", unit="step", enabled=progress, leave=False)
    for name, backward in plan:
        bar.set_postfix_str(f"{name} {'fwd+bwd' if backward else 'fwd'}")
        done = bar.n + repeats + 1                # where the bar stands after this variant, even when it fails
        fn = variants[name]
        leaves = (q, k, v) if name == "sdpa" else (q, k, v, wb, wc)

        def step(fn=fn, backward=backward, leaves=leaves):
            if not backward:
                with torch.no_grad():
                    return fn()
            out = fn()
            return torch.autograd.grad(out, leaves, torch.ones_like(out))

        try:
            res = _timed(step, device, repeats, tick=bar.update)
        except Exception as exc:  # noqa: BLE001 - e.g. FlexAttention without this device's backward
            rows.append(dict(variant=name, pass_="fwd+bwd" if backward else "fwd", time_ms=None, peak_mib=None,
                             note=f"does not run here ({type(exc).__name__})"))
            bar.update(done - bar.n)
            continue
        rows.append(dict(variant=name, pass_="fwd+bwd" if backward else "fwd", note="", **res))
    bar.close()
    base = {r["pass_"]: r["time_ms"] for r in rows if r["variant"] == "sdpa"}
    for r in rows:
        r["x_sdpa"] = None if r["time_ms"] is None or not base.get(r["pass_"]) else r["time_ms"] / base[r["pass_"]]
    if not quick and "dense-bias" not in variants:
        rows.append(dict(variant="dense-bias", pass_="-", time_ms=None, peak_mib=None, x_sdpa=None,
                         note=f"skipped: needs about {dense_bytes / 1e9:.1f} GB, {free / 1e9:.1f} GB free"))
    return rows


def format_timing(rows: Sequence[Dict]) -> str:
    """The timing table: one line per (variant, pass); ``-`` where a figure does not exist."""
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    lines = [f"{'variant':12s} {'pass':8s} {'time [ms]':>10s} {'x sdpa':>7s} {'peak [MiB]':>11s}  note"]
    for r in rows:
        lines.append(f"{r['variant']:12s} {r['pass_']:8s} {fmt(r['time_ms'], '10.2f'):>10s} "
                     f"{fmt(r['x_sdpa'], '7.3f'):>7s} {fmt(r['peak_mib'], '11.1f'):>11s}  {r['note']}")
    return "\n".join(lines)


def selftest(device: Optional[str] = None, dtypes: Sequence[str] = tuple(DTYPES), *, quick: bool = False,
             timing: bool = True, queries: Optional[int] = None, window: Optional[int] = None,
             layout: Optional[str] = None, timing_dtype: str = "float32", repeats: Optional[int] = None, json_path: Optional[str] = None,
             progress: bool = True, log: Callable[[str], None] = print) -> Dict:
    """Run the self-test (``python -m sparse_bias.tools.selftest`` is its command line) and return its report.

    Args:
        device: e.g. ``"cuda:0"``; default the best available.
        dtypes: names of the dtypes to check (``"float32"``, ``"bfloat16"``, ``"float16"``).
        quick: small sizes everywhere (timing at 32 queries, windows 5, the ``small`` layout, one repeat, for
            each of those not given).
        timing: also run the timing table.
        queries: queries of the timing problem (default 900; 32 with ``quick``).
        window: BEV and camera window size of the timing problem, odd (default 15; 5 with ``quick``).
        layout: key layout of the timing problem, ``"fusion"`` or ``"small"`` (default fusion; small with ``quick``).
        timing_dtype: the dtype of the timing problem.
        repeats: timing repeats, median (default 5; 1 with ``quick``).
        json_path: also write the report there.
        progress: progress on stderr (`sparse_bias.tools.cli.progress_bar`: a tqdm bar on a terminal, a plain
            line every few seconds elsewhere).
        log: where the lines go.

    Returns:
        ``{"passed": bool, "device", "torch", "checks": [...], "timing": [...], "self_checks": [...]}``.

    Example:
        >>> from sparse_bias.tools.selftest import selftest
        >>> report = selftest("cpu", ["float32"], quick=True, timing=False, log=lambda line: None, progress=False)
        >>> report["passed"]
        True
    """
    dev = torch.device(device or _best_device())
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here")
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise ValueError(f"dtypes must be among {sorted(DTYPES)}, got {bad}")
    queries = (32 if quick else 900) if queries is None else queries
    window = (5 if quick else 15) if window is None else window
    layout = ("small" if quick else "fusion") if layout is None else layout
    repeats = (1 if quick else 5) if repeats is None else repeats
    for what, value, odd in (("queries", queries, False), ("window", window, True), ("repeats", repeats, False)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (odd and value % 2 == 0):
            raise ValueError(f"{what} must be {'an odd' if odd else 'a'} positive int, got {value!r}")
    if layout not in ("fusion", "small"):
        raise ValueError(f"layout must be 'fusion' or 'small', got {layout!r}")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    log(f"sparse_bias self-test on {dev} ({name}); torch {torch.__version__}")
    if timing:                               # the whole run's cost up front: the timing part may need GBs
        keys = CMT_CONFIGS[layout].layout.num_keys
        part = _timing_estimate(dev, DTYPES[timing_dtype], queries, keys, _timing_names(dev, queries, keys), repeats)
        checks_s = len(_plan(dev, [DTYPES[d] for d in dtypes])) * CHECK_SECONDS[quick]
        whole = Estimate("the whole self-test", "the exactness checks, then the timing; --no-timing skips the timing",
                         None if part.seconds is None else part.seconds + checks_s,
                         max(part.gb, CHECK_GB) if dev.type == "cpu" else part.gb, part.memory)
        log(whole.line())
    checks = _checks(dev, [DTYPES[d] for d in dtypes], quick, progress, log)
    passed = all(r["passed"] for r in checks)
    log(f"exactness: {sum(r['passed'] for r in checks)} of {len(checks)} checks passed")
    report = dict(passed=passed, device=str(dev), device_name=name, torch=torch.__version__, checks=checks,
                  timing=[], self_checks=[dict(op=k[0], backend=k[1], device=k[2], dtype=str(k[3]), head_dim=k[4],
                                               passed=v[0], detail=v[1]) for k, v in self_check_results().items()])
    if timing:
        log(f"\ntiming: {layout} layout, B=2, H=8, D=32, Q={queries}, windows {window}/{window}, {timing_dtype}, "
            f"median of {repeats}")
        report["timing"] = _timing(dev, DTYPES[timing_dtype], queries, window, layout, repeats, progress, quick,
                                   log)
        log(format_timing(report["timing"]))
    log("\nresult: " + ("PASS" if passed else "FAIL -- please report this output (and --json) with "
                         + _machine_to_report(dev, name)))
    if json_path:
        write_json(json_path, report, default=str)
    return report


def _machine_to_report(dev, name: str) -> str:
    """What a failure report should name about the machine: the GPU on a CUDA run, the CPU and OS otherwise."""
    if dev.type == "cuda":
        return f"your GPU model ({name}), driver and torch version"
    return (f"your CPU model ({name}), operating system ({platform.system()} {platform.release()}) and torch "
            "version")


def _parser() -> Parser:
    p = Parser.for_tool("selftest", __doc__)
    p.add_argument("--device", default=_best_device(), help="device to test, e.g. cuda:0 or cpu")
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="dtypes to check")
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (a minute on a CPU)")
    p.add_argument("--no-timing", dest="timing", action="store_false", help="only the exactness checks")
    p.add_argument("--queries", type=positive_int, default=900, quick=32, help="queries of the timing problem")
    p.add_argument("--window", type=odd_positive_int, default=15, quick=5,
                   help="BEV and camera window size of the timing problem (odd)")
    p.add_argument("--layout", default="fusion", quick="small", choices=["fusion", "small"],
                   help="key layout of the timing problem")
    p.add_argument("--timing-dtype", default="float32", choices=list(DTYPES), help="dtype of the timing problem")
    p.add_argument("--repeats", type=positive_int, default=5, quick=1, help="timing repeats (median)")
    p.add_argument("--json", default=None, help="also write the report to this JSON file (default: none)")
    return p


def main(argv=None) -> int:
    """Console entry: exit status 0 when every check passed, 1 otherwise."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: not a device: {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (use --device cpu)")
    report = selftest(args.device, args.dtypes, quick=args.quick, timing=args.timing, queries=args.queries,
                      window=args.window, layout=args.layout, timing_dtype=args.timing_dtype, repeats=args.repeats,
                      json_path=args.json)
    return 0 if report["passed"] else 1


def cli() -> int:
    """Console entry point ``sparse-bias-selftest``."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())


