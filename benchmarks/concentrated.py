"""Concentrated attention at the CMT shape: precision against float64 and cost against unbiased SDPA, in one run.

    python benchmarks/concentrated.py                 # CMT fusion layout (K = 56,400), H=8, D=32, windows 15/15
    python benchmarks/concentrated.py --quick         # small sizes (the test suite runs this)

Part 1 (precision, Q = 300 as measured for the dense version): window keys leaning towards their query so that the
window holds a median share of 0.29 / 0.89 / 0.999 of the unbiased mass, a flat bias of 5 x w with |w| in [0.8, 1]
(all, half or none of the queries negative; `PRECISION_CASES`); the largest per-row error relative to the row's
largest value (|x - ref| / max |ref row|), output and gradients, of the dense version in that dtype -- SDPA with the
dense bias (its math path: the bias has a gradient) and a flash-style kernel (PyTorch's CPU flash kernel, gradients
with ``<g, o>`` from its rounded output, as CUDA's efficient attention computes them) -- and of
``sparse_bias_attention`` (auto backend), all against float64, and the share of rows the exact path evaluated. Part 2
(cost, Q = 900): forward + backward medians, interleaved per repeat, of unbiased SDPA (the flash kernel), the dense
version (SDPA with the dense bias, its gradient included), ``sparse_bias_attention`` on random q / k (the window holds
~1 % of the mass) and on concentrated q / k (share 0.9, half the queries negative), with their ratios to SDPA.
"""
import argparse
import contextlib
import statistics
import time

import torch

import sparse_bias as sb
from sparse_bias._core import correction as _sparse_function
from sparse_bias._core.concentrated import concentrated_qk, signed_bias, window_share
from sparse_bias.tools.synthetic import synthetic_scene

NAMES = ("out", "dq", "dk", "dv", "dbias")


def row_error(got, ref):
    err = (got - ref).abs().amax(-1)
    size = ref.abs().amax(-1).clamp(min=1e-6 * float(ref.abs().max()))
    return float((err / size).max())


def evaluate(fn, q, k, v, bias, grad, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, bias.values)]
    out = fn(*leaves[:3], sb.SparseBias(bias.index, leaves[3]))
    grads = torch.autograd.grad(out, leaves, grad.to(dtype))
    dense_db = sb.SparseBias(bias.index, grads[3].double()).to_dense()
    return [out.detach().double()] + [g.double() for g in grads[:3]] + [dense_db]


def flash_style(q, k, v, bias, grad, dtype):
    """The dense version on a flash-style kernel (CUDA's efficient attention, FlexAttention, the CPU flash kernel):
    the output of PyTorch's CPU flash kernel with the dense bias, the gradients of ``ds = p (dp - <g, o>)`` with
    that rounded output, float32 arithmetic on the inputs rounded to ``dtype``. float64, as `evaluate`."""
    qd, kd, vd, gd = (t.to(dtype) for t in (q, k, v, grad))
    bd = bias.to_dense().detach().unsqueeze(1)
    qf, kf, vf, gf = (t.float() for t in (qd, kd, vd, gd))
    scale = q.shape[-1] ** -0.5
    p = torch.softmax(qf @ kf.transpose(-1, -2) * scale + bd.to(dtype).float(), -1)
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)    # torch 2.2+
    out = (flash(qd, kd, vd, attn_mask=bd.to(dtype))[0] if flash is not None
           else (p @ vf).to(dtype))                      # before: the rounded output of the same algorithm
    ds = p * (gf @ vf.transpose(-1, -2) - (gf * out.float()).sum(-1, keepdim=True))
    grads = [ds @ kf * scale, ds.transpose(-1, -2) @ qf * scale, p.transpose(-1, -2) @ gf, ds.sum(1)]
    return [out.double()] + [t.to(dtype).double() for t in grads]


def sdpa_dense(q, k, v, bias):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.to_dense())


def library(q, k, v, bias):
    return sb.sparse_bias_attention(q, k, v, bias)


@contextlib.contextmanager
def flags_seen():
    """The exact-row flags ``[B, Q]`` of the attention calls made inside, in a list."""
    seen = []
    original = _sparse_function.flagged_rows
    _sparse_function.flagged_rows = lambda *a: seen.append(original(*a)) or seen[-1]
    try:
        yield seen
    finally:
        _sparse_function.flagged_rows = original


def flagged_share(q, k, v, bias, dtype):
    with flags_seen() as seen:
        sb.sparse_bias_attention(q.to(dtype), k.to(dtype), v.to(dtype), bias.to(dtype))
    return float(seen[0].float().mean())


#: (window share, fraction of negative queries, dtypes): the dense version's measured configurations, and 0.999
PRECISION_CASES = ((0.29, 1.0, ("float32", "bfloat16")), (0.89, 1.0, ("float32", "float16")),
                   (0.89, 0.5, ("float32", "bfloat16")), (0.89, 0.0, ("float32",)),
                   (0.999, 1.0, ("float32", "bfloat16")), (0.999, 0.5, ("float32",)))


def cpu_matmul(dtype) -> bool:
    """Whether this torch multiplies ``dtype`` matrices on the CPU (torch 2.0 / 2.1 have no float16 matmul there)."""
    try:
        torch.ones(1, 1, dtype=dtype) @ torch.ones(1, 1, dtype=dtype)
    except RuntimeError:
        return False
    return True


def precision(win, heads, dim, cases):
    print("| dtype | window share (median) | negative weights | rows exact | dense SDPA (math), same dtype "
          "(out / dq / dk / dv / dbias) | dense, flash-style | sparse_bias | worst ratio to the larger dense |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    mask = win.to_dense_mask()
    for share, negative, dtypes in cases:
        q, k = concentrated_qk(win, heads, dim, share, generator=gen)
        v = torch.randn(k.shape, generator=gen, dtype=torch.float64)
        grad = torch.randn(q.shape, generator=gen, dtype=torch.float64)
        median = float(window_share(q, k, win).median())
        label = {1.0: "all", 0.5: "half", 0.0: "none"}[negative]
        bias = signed_bias(win, 5.0, negative, generator=gen)
        ref = evaluate(sdpa_dense, q, k, v, bias, grad, torch.float64)
        ref[4] = ref[4] * mask
        for dtype in (getattr(torch, d) for d in dtypes):
            if not cpu_matmul(dtype):
                name = str(dtype).replace("torch.", "")
                print(f"| {name} | skipped: this torch has no {name} matmul on CPU, so the dense version cannot "
                      "run |||||||")
                continue
            dense = evaluate(sdpa_dense, q, k, v, bias, grad, dtype)
            dense[4] = dense[4] * mask
            flash = flash_style(q, k, v, bias, grad, dtype)
            flash[4] = flash[4] * mask
            with flags_seen() as seen:
                ours = evaluate(library, q, k, v, bias, grad, dtype)
            ed = [row_error(a, r) for a, r in zip(dense, ref)]
            ef = [row_error(a, r) for a, r in zip(flash, ref)]
            eo = [row_error(a, r) for a, r in zip(ours, ref)]
            worst = max(o / max(d, f) for o, d, f in zip(eo, ed, ef))
            exact = float(seen[0].float().mean())
            print(f"| {str(dtype).replace('torch.', '')} | {median:.3f} | {label} | {exact:.0%} | "
                  f"{' / '.join(f'{e:.1e}' for e in ed)} | {' / '.join(f'{e:.1e}' for e in ef)} | "
                  f"{' / '.join(f'{e:.1e}' for e in eo)} | {worst:.1f}x |",
                  flush=True)


def cost(win, heads, dim, repeats):
    gen = torch.Generator().manual_seed(1)
    nk = win.layout.num_keys
    rand_q = torch.randn(1, heads, win.num_queries, dim, generator=gen)
    rand_k = torch.randn(1, heads, nk, dim, generator=gen)
    conc_q, conc_k = (t.float() for t in concentrated_qk(win, heads, dim, 0.9, generator=gen))
    v = torch.randn(1, heads, nk, dim, generator=gen)
    bias = signed_bias(win, 5.0, 0.5, generator=gen, dtype=torch.float32)
    steps = {
        "SDPA, no bias (flash)": (rand_q, rand_k, None),
        "dense version: SDPA with the dense bias": (conc_q, conc_k, "dense"),
        "sparse_bias, random q / k": (rand_q, rand_k, bias),
        "sparse_bias, concentrated (share 0.9)": (conc_q, conc_k, bias),
    }
    rows = {name: flagged_share(q, k, v, b, torch.float32) for name, (q, k, b) in steps.items()
            if isinstance(b, sb.SparseBias)}

    def step(q, k, b):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if b is None:
            out = torch.nn.functional.scaled_dot_product_attention(*leaves)
        elif b == "dense":                       # the bias is learnable: it needs its gradient
            values = bias.values.detach().requires_grad_()
            out = torch.nn.functional.scaled_dot_product_attention(
                *leaves, attn_mask=sb.SparseBias(bias.index, values).to_dense().unsqueeze(1))
        else:
            out = sb.sparse_bias_attention(*leaves, sb.SparseBias(b.index, b.values.detach().requires_grad_()))
        out.sum().backward()

    times = {name: [] for name in steps}
    for name, args in steps.items():
        step(*args)                                                        # warm-up
    for _ in range(repeats):
        for name, args in steps.items():
            t0 = time.perf_counter()
            step(*args)
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["SDPA, no bias (flash)"])
    print(f"\nforward + backward, B=1, H={heads}, D={dim}, Q={win.num_queries}, K={nk}, nnz={win.nnz}, "
          f"median of {repeats} interleaved repeats, {torch.get_num_threads()} threads:")
    print("| step | rows exact | time | / SDPA |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        exact = f"{rows[name]:.0%}" if name in rows else "--"
        print(f"| {name} | {exact} | {med * 1000:.0f} ms | {med / base:.2f}x |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-precision", action="store_true")
    p.add_argument("--skip-cost", action="store_true")
    args = p.parse_args(argv)
    config, heads, dim, window, (nq_prec, nq_cost) = "fusion", 8, 32, 15, (300, 900)
    cases = PRECISION_CASES
    if args.quick:
        config, heads, dim, window, (nq_prec, nq_cost), args.repeats = "small", 2, 16, 5, (16, 32), 2
        cases = cases[:3]
    for part, nq in (("precision", nq_prec), ("cost", nq_cost)):
        if getattr(args, f"skip_{part}"):
            continue
        scene = synthetic_scene(1, nq, config=config, seed=0)
        win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, window, window)
        if part == "precision":
            precision(win, heads, dim, cases)
        else:
            cost(win, heads, dim, args.repeats)


if __name__ == "__main__":
    main()
