"""Small problems and threads: time per step with 1 and 2 threads, side by side in one run.

    python benchmarks/threads.py                    # the rows below, 7 interleaved repeats
    python benchmarks/threads.py --threads 1 2 4    # other thread counts (torch.set_num_threads)
    python benchmarks/threads.py --quick            # fewer steps and a smaller contrast row

Rows, at the shapes of the two CMT training examples, and one larger call for contrast:

- ``decoder attention``: `sparse_bias.sparse_bias_attention` forward + backward at the cross-attention of
  ``examples/cmt_decoder_training.py`` (B=8, 4 heads of 8, Q=24, K=352 keys: 16x16 BEV and 2x6x8 camera cells,
  a one-cell window per modality);
- ``aqr window attention``: `sparse_bias.window_attention` forward + backward at the AQR of
  ``examples/cmt_aqr_training.py`` (B=4, 4 heads of 8, Q=24, K=496 keys: 16x16 BEV and 6x4x10 camera cells,
  windows 3/3);
- ``decoder training step``: one Adam step of the decoder example's model shape -- a 2-layer `CmtTransformer`
  (C=32, 4 heads, feed-forward 64) with the AQR weights of an `MLPWeightGenerator` and the sparse bias, a linear
  head -- so torch's own operators (linear layers, layer norms, the dense flash pass, the optimiser) are in it;
- ``larger call (contrast)``: `sparse_bias.sparse_bias_attention` forward + backward at B=2, 8 heads of 32,
  Q=300 (``--quick``: 64), the small CMT layout (22,384 keys), windows 15/15: big enough that the kernels split
  it over threads.

Per row: the median time per step with each thread count (repeats interleaved: every repeat runs every thread
count once, after a warm-up), the ratio to one thread, and the fused-kernel calls per step that ran on more than
one thread (``sparse_bias._C.parallel_calls()``; 0 = every kernel call ran on the calling thread). The load
average is printed before and after: on a machine whose cores are shared with other processes, OpenMP's
waiting workers take the calling thread's time, and every parallel region costs far more than on an idle one.
"""
import argparse
import os
import statistics
import time

import torch
from torch import nn

import sparse_bias as sb
from sparse_bias._core.extension import extension
from sparse_bias.nn import CmtTransformer, MLPWeightGenerator
from sparse_bias.tools.synthetic import synthetic_scene

C, HEADS, Q_EXAMPLE = 32, 4, 24


def _cells(gen, batch, queries, layout):
    """Random BEV cells ``[B, Q, 2]`` and camera cells ``[B, Q, 3]`` of ``layout``."""
    (hb, wb), (views, hc, wc) = layout.bev_shape, layout.cam_shape
    bev = torch.stack([torch.randint(0, hb, (batch, queries), generator=gen),
                       torch.randint(0, wb, (batch, queries), generator=gen)], -1)
    cam = torch.stack([torch.randint(0, views, (batch, queries), generator=gen),
                       torch.randint(0, hc, (batch, queries), generator=gen),
                       torch.randint(0, wc, (batch, queries), generator=gen)], -1)
    return bev, cam


def _attention_step(q, k, v, make_bias, fn, weights=()):
    """A closure: ``fn`` forward + backward into q, k, v and the bias ``weights`` (`torch.autograd.grad`: the
    gradients as the op returns them, not copied into the leaves' layout as ``.backward()`` would)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step():
        out = fn(*leaves, make_bias())
        torch.autograd.grad(out.square().mean(), leaves + list(weights))
    return step


def decoder_attention():
    gen = torch.Generator().manual_seed(0)
    layout = sb.KeyLayout(bev_shape=(16, 16), cam_shape=(2, 6, 8))
    batch, d = 8, C // HEADS
    bev, cam = _cells(gen, batch, Q_EXAMPLE, layout)
    win = sb.local_windows(layout, bev, cam, 1, 1)
    weights = torch.rand(2, batch, Q_EXAMPLE, generator=gen).requires_grad_()
    q = torch.randn(batch, HEADS, Q_EXAMPLE, d, generator=gen)
    k, v = (torch.randn(batch, HEADS, layout.num_keys, d, generator=gen) for _ in range(2))
    return _attention_step(q, k, v, lambda: sb.window_bias(win, weights[0], weights[1], scale=8.0),
                           lambda q, k, v, bias: sb.sparse_bias_attention(q, k, v, bias), [weights])


def aqr_window_attention():
    gen = torch.Generator().manual_seed(0)
    layout = sb.KeyLayout(bev_shape=(16, 16), cam_shape=(6, 4, 10))
    batch, d = 4, C // HEADS
    bev, cam = _cells(gen, batch, Q_EXAMPLE, layout)
    win = sb.local_windows(layout, bev, cam, 3, 3)
    q = torch.randn(batch, HEADS, Q_EXAMPLE, d, generator=gen)
    k, v = (torch.randn(batch, HEADS, layout.num_keys, d, generator=gen) for _ in range(2))
    return _attention_step(q, k, v, lambda: None, lambda q, k, v, _: sb.window_attention(q, k, v, win))


class _Decoder(nn.Module):
    """The decoder example's model shape: cell embedding, MLP AQR weights, sparse bias, 2-layer CmtTransformer."""

    def __init__(self, layout):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(5, C), nn.ReLU(), nn.Linear(C, C))
        self.bev_pos = nn.Parameter(torch.randn(layout.bev_shape[0] * layout.bev_shape[1], C) * 0.1)
        self.rv_pos = nn.Parameter(torch.randn(*layout.cam_shape, C) * 0.1)
        self.transformer = CmtTransformer(C, HEADS, num_layers=2, feedforward_channels=64, dropout=0.0)
        self.aqr = MLPWeightGenerator(C, batch_first=True)
        self.bias = sb.build_attention_bias(dict(
            enable=True, window_size=1, bias_scale=8.0, use_local_bias=True, fp16=False, debug_mode=False,
            bev_feature_shape=layout.bev_shape, pers_feature_shape=layout.cam_shape))
        self.head = nn.Linear(C, C)

    def forward(self, x, x_img, bev, cam):
        qe = self.embed(torch.cat([bev.float(), cam.float()], -1) / 16.0)
        bias = self.bias(*self.aqr(qe), bev, cam)
        rv_pos = self.rv_pos.repeat(x.shape[0], 1, 1, 1)
        out, _ = self.transformer(x, x_img, qe, self.bev_pos, rv_pos, attention_bias=bias)
        return self.head(out[-1])


def decoder_training_step():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    layout = sb.KeyLayout(bev_shape=(16, 16), cam_shape=(2, 6, 8))
    batch = 8
    model = _Decoder(layout)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, C, 16, 16, generator=gen)
    x_img = torch.randn(batch * 2, C, 6, 8, generator=gen)
    bev, cam = _cells(gen, batch, Q_EXAMPLE, layout)
    target = torch.randn(batch, Q_EXAMPLE, C, generator=gen)

    def step():
        loss = (model(x, x_img, bev, cam) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def larger_call(queries):
    scene = synthetic_scene(batch_size=2, num_queries=queries, config="small", seed=0)
    win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, 15, 15)
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(2, 2, queries, generator=gen).requires_grad_()
    q = torch.randn(2, 8, queries, 32, generator=gen)
    k, v = (torch.randn(2, 8, scene.layout.num_keys, 32, generator=gen) for _ in range(2))
    return _attention_step(q, k, v, lambda: sb.window_bias(win, weights[0], weights[1]),
                           lambda q, k, v, bias: sb.sparse_bias_attention(q, k, v, bias), [weights])


def _parallel_calls():
    ext = extension()[0]
    return ext.parallel_calls() if ext is not None and hasattr(ext, "parallel_calls") else 0


def measure(step, threads, repeats, steps):
    """``{threads: (median seconds per step, parallel kernel calls per step)}``, repeats interleaved."""
    before = torch.get_num_threads()
    times = {t: [] for t in threads}
    calls = {}
    try:
        for t in threads:                                   # warm-up: index caches, first-use allocations
            torch.set_num_threads(t)
            step()
        for _ in range(repeats):
            for t in threads:
                torch.set_num_threads(t)
                c0 = _parallel_calls()
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[t].append((time.perf_counter() - start) / steps)
                calls[t] = (_parallel_calls() - c0) / steps
    finally:
        torch.set_num_threads(before)
    return {t: (statistics.median(times[t]), calls[t]) for t in threads}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default: 1 2)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (default: 7)")
    parser.add_argument("--quick", action="store_true", help="fewer steps, a smaller contrast row")
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.threads) or args.repeats < 1:
        parser.error(f"--threads and --repeats must be positive, got {args.threads} and {args.repeats}")
    small_steps, large_steps, large_q = (3, 1, 64) if args.quick else (20, 2, 300)
    rows = [("decoder attention", decoder_attention, small_steps),
            ("aqr window attention", aqr_window_attention, small_steps),
            ("decoder training step", decoder_training_step, small_steps),
            (f"larger call (Q={large_q})", lambda: larger_call(large_q), large_steps)]
    ext, why = extension()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; fused kernels: {'yes' if ext else why}")
    print(f"load average before: {os.getloadavg()[0]:.2f} (1 min); median of {args.repeats} interleaved repeats")
    head = "".join(f"{f'{t} thr [ms]':>12s}" for t in args.threads)
    ratios = "".join(f"{f'{t}/{args.threads[0]}':>8s}" for t in args.threads if t != args.threads[0])
    calls = "".join(f"{f'par@{t}':>8s}" for t in args.threads)
    print(f"{'row':28s}{head}{ratios}{calls}")
    for name, build, steps in rows:
        res = measure(build(), args.threads, args.repeats, steps)
        base = res[args.threads[0]][0]
        print(f"{name:28s}" + "".join(f"{res[t][0] * 1e3:12.2f}" for t in args.threads)
              + "".join(f"{res[t][0] / base:8.2f}" for t in args.threads if t != args.threads[0])
              + "".join(f"{res[t][1]:8.1f}" for t in args.threads), flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min); par@N = fused-kernel calls per step that ran on "
          "more than one thread with N threads")


if __name__ == "__main__":
    main()
