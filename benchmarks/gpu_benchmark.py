"""GPU benchmark: sparse-bias attention against flash SDPA, the dense-bias version and FlexAttention.

    python benchmarks/gpu_benchmark.py                  # on a CUDA machine: the full grid, table + JSON
    python benchmarks/gpu_benchmark.py --dry-run        # tiny sizes on the CPU (checks that everything runs)

Grid: CMT fusion layout (K=56400), B=2, H=8, D=32, Q in {900, 1800}, windows 15/15 and 5/15, bf16 and
fp32, forward and forward + backward (gradients of q, k, v and the bias weights). Variants: unbiased flash
SDPA (the floor), sparse-bias attention with every backend (triton, scatter, torch, sparse), the dense-bias
SDPA (materialised [B, 1, Q, K] bias) and FlexAttention with a ``score_mod`` computing the same window bias
on the fly (compiled). Each variant is first checked against the dense reference on the same inputs;
times are CUDA-event medians after warm-up, memory is ``torch.cuda.max_memory_allocated`` above the
inputs. Targets: sparse fwd+bwd <= 1.2x flash SDPA, faster than FlexAttention, <= 1.1x its peak memory.
"""
import argparse
import itertools
import json
import os
import statistics
import sys
import time

if "--dry-run" in sys.argv:          # the Triton kernels run under the interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import sparse_bias as sb  # noqa: E402
from sparse_bias.flex import flex_score_mod  # noqa: E402
from sparse_bias.tools.synthetic import synthetic_scene  # noqa: E402

BACKENDS = ("triton", "scatter", "torch", "sparse")


def make_inputs(cfg, queries, windows, dtype, device):
    scene = synthetic_scene(2, queries, config=cfg, seed=0, device=device)
    win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, *windows)
    gen = torch.Generator(device=device).manual_seed(0)
    k_len = scene.layout.num_keys
    q, k, v = (torch.randn(2, 8, n, 32, generator=gen, device=device).to(dtype).requires_grad_()
               for n in (queries, k_len, k_len))
    lw, cw = (torch.rand(2, queries, generator=gen, device=device).requires_grad_() for _ in range(2))
    return scene, win, q, k, v, lw, cw


def variant_fn(name, scene, win, windows, q, k, v, lw, cw, flex):
    if name == "sdpa":
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)
    if name == "dense-bias":
        return lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=sb.window_bias(win, lw, cw).to_dense().unsqueeze(1).to(q.dtype))
    if name == "flex":
        if q.device.type == "cpu":                 # FlexAttention has no CPU backward: forward on detached inputs
            q, k, v, lw, cw = (t.detach() for t in (q, k, v, lw, cw))
        mod = flex_score_mod(scene.layout, scene.bev_pos, scene.cam_pos, *windows, lw, cw)
        return lambda: flex(q, k, v, score_mod=mod)
    backend = name.split("-", 1)[1]
    return lambda: sb.sparse_bias_attention(q, k, v, sb.window_bias(win, lw, cw), backend=backend)


def timed(fn, backward, leaves, device, repeats):
    def step():
        out = fn()
        if backward:
            torch.autograd.grad(out, leaves, torch.ones_like(out))
        return out

    step()                                                          # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
            peak = None                                               # no allocator statistics on CPU
    return statistics.median(times), peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device: use --dry-run")
    if args.dry_run:
        grid = [("small", 32, (5, 5), torch.float32)]
        args.repeats = 1
    else:
        grid = [("fusion", q, w, dt) for q, w, dt in itertools.product((900, 1800), ((15, 15), (5, 15)),
                                                                        (torch.bfloat16, torch.float32))]
    flex = None
    try:
        from torch.nn.attention.flex_attention import flex_attention
        flex = flex_attention if device == "cpu" else torch.compile(flex_attention)
    except ImportError:
        pass
    rows = []
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu (dry run)'}; torch {torch.__version__}")
    for cfg, queries, windows, dtype in grid:
        scene, win, q, k, v, lw, cw = make_inputs(cfg, queries, windows, dtype, device)
        leaves = (q, k, v, lw, cw)
        names = ["sdpa"] + [f"sparse-{b}" for b in BACKENDS
                            if sb.backends.BACKENDS[b].can_run(q.device, q.dtype)[0]] + ["dense-bias"]
        if flex is not None:
            names.append("flex")
        with torch.no_grad():
            ref = sb.dense_bias_attention(q.float(), k.float(), v.float(), sb.window_bias(win, lw, cw).to_dense())
        point = []
        for name in names:
            fn = variant_fn(name, scene, win, windows, q, k, v, lw, cw, flex)
            err = None
            if name != "sdpa":
                try:
                    with torch.no_grad():
                        out = fn().float()
                    err = float((out - ref).abs().max() / ref.abs().max().detach())
                except Exception as exc:                       # e.g. FlexAttention without a CPU backend
                    print(f"  {name}: skipped ({type(exc).__name__}: {str(exc)[:80]})")
                    continue
            for backward in (False, True):
                if backward and name == "flex" and device == "cpu":
                    continue                                  # no compiled CPU backward for FlexAttention
                t, peak = timed(fn, backward, leaves if name != "sdpa" else leaves[:3], device, args.repeats)
                point.append(dict(layout=cfg, queries=queries, windows=f"{windows[0]}/{windows[1]}",
                                  dtype=str(dtype).replace("torch.", ""), variant=name,
                                  pass_="fwd+bwd" if backward else "fwd", time_ms=t * 1e3, peak_mib=peak,
                                  rel_err=err))
        base = {r["pass_"]: r["time_ms"] for r in point if r["variant"] == "sdpa"}
        print(f"\n{cfg} Q={queries} windows {windows[0]}/{windows[1]} {dtype}")
        print(f"{'variant':16s} {'pass':8s} {'time [ms]':>10s} {'x sdpa':>7s} {'peak [MiB]':>11s} {'rel err':>8s}")
        for r in point:
            r["x_sdpa"] = r["time_ms"] / base[r["pass_"]]
            err = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            print(f"{r['variant']:16s} {r['pass_']:8s} {r['time_ms']:10.2f} {r['x_sdpa']:7.2f} {peak:>11s} {err:>8s}")
        rows += point
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
