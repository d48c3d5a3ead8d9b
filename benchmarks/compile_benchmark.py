"""The attention module eager and under torch.compile, side by side (CPU; CUDA when available).

    python benchmarks/compile_benchmark.py              # CMT fusion shape: B=2, C=256, H=8, Q=900, K=56,400, windows 15
    python benchmarks/compile_benchmark.py --quick      # tiny sizes, aot_eager (the test suite runs this)

Times forward + backward of ``SparseBiasMultiheadAttention`` with the window bias of the AQR weights
(``window_bias`` + ``sparse_bias_attention``) eager and compiled with ``torch.compile(fullgraph=True)`` (Inductor by
default), interleaved per repeat, after checking that both agree. Prints the medians and their ratio. The attention
itself is one opaque custom op in the compiled graph, so the ratio measures what compiling the projections and the
bias around it changes.
"""
import argparse
import statistics
import time

import torch

import sparse_bias as sb
from sparse_bias.nn import SparseBiasMultiheadAttention
from sparse_bias.tools.synthetic import synthetic_scene


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=900)
    p.add_argument("--window", type=int, default=15)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default: inductor)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and the aot_eager backend")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config, embed, heads = ("fusion", 256, 8)
    if args.quick:
        args.queries, args.repeats, args.backend, config, embed, heads = 24, 2, "aot_eager", "small", 32, 4
    torch.manual_seed(0)
    scene = synthetic_scene(2, args.queries, config=config, seed=0, device=device)
    win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, args.window, args.window)
    mha = SparseBiasMultiheadAttention(embed, heads).to(device).train()
    query = torch.randn(args.queries, 2, embed, device=device, requires_grad=True)
    memory = torch.randn(scene.layout.num_keys, 2, embed, device=device, requires_grad=True)
    wb, wc = (torch.rand(2, args.queries, device=device, requires_grad=True) * 2 - 1 for _ in range(2))

    def step(query, memory, wb, wc):
        return mha(query, memory, memory, attention_bias=sb.window_bias(win, wb, wc))

    compiled = torch.compile(step, fullgraph=True, backend=args.backend)
    inputs = (query, memory, wb, wc)
    t0 = time.perf_counter()
    out_c = compiled(*inputs)
    grads_c = torch.autograd.grad(out_c.square().sum(), inputs)
    first = time.perf_counter() - t0
    out_e = step(*inputs)
    grads_e = torch.autograd.grad(out_e.square().sum(), inputs)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    def timed(fn):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*inputs)
        torch.autograd.grad(out.square().sum(), inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        times["eager"].append(timed(step))
        times["compiled"].append(timed(compiled))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SparseBiasMultiheadAttention forward + backward, {device}, B=2 C={embed} H={heads} Q={args.queries} "
          f"K={scene.layout.num_keys} nnz={win.nnz}, windows {args.window}, compile backend {args.backend}")
    print(f"  compile + first call: {first:.1f} s (outputs and gradients agree with eager)")
    for k in ("eager", "compiled"):
        print(f"  {k:9s} {med[k] * 1000:9.1f} ms  (median of {args.repeats})")
    print(f"  compiled / eager: {med['compiled'] / med['eager']:.3f}x")
    return med


if __name__ == "__main__":
    main()
