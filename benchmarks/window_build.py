"""Time local_windows at the CMT training shape: B=2, Q=1800, windows 15/15, M=2 views per query.

    python benchmarks/window_build.py [--repeats 9]

Two cases: the synthetic scene's own projections, and the worst case where every query is seen by two
cameras. Prints the median and the minimum over the repeats.
"""
import argparse
import statistics
import time

import torch

import sparse_bias as sb
from sparse_bias.tools.synthetic import synthetic_scene


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--queries", type=int, default=1800)
    args = parser.parse_args()
    scene = synthetic_scene(2, args.queries, seed=0)
    worst = scene.cam_pos.clone()
    worst[..., 0, 0] = torch.randint(0, 6, worst.shape[:2])
    worst[..., 0, 1:] = torch.stack([torch.randint(0, 40, worst.shape[:2]),
                                     torch.randint(0, 100, worst.shape[:2])], -1)
    worst[..., 1, :] = worst[..., 0, :]
    worst[..., 1, 0] = (worst[..., 0, 0] + 1) % 6
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=2, Q={args.queries}, windows 15/15")
    for name, cam_pos in [("synthetic scene", scene.cam_pos), ("every query in two views", worst)]:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            win = sb.local_windows(scene.layout, scene.bev_pos, cam_pos, 15, 15)
            times.append(time.perf_counter() - start)
        print(f"{name:26s} nnz={win.nnz:8d}  median {statistics.median(times) * 1e3:6.1f} ms  "
              f"min {min(times) * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
