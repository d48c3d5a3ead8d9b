# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Visualising the bias
#
# The dense version's "bias distribution" plots, for the flat and the Gaussian profile, and per head. Each PNG
# has one row per query: its window on the BEV grid (with a zoom) and on each camera view it projects into, in
# cells, with the projected point marked (+) and the window outlined; grey cells hold no bias entry. One colour
# scale per figure: sequential from 0 when the values have one sign, diverging around 0 when they have both
# (the per-head weights below). Writes PNGs to `examples_out/`.

# %%
import os

import torch

import sparse_bias as sb
from sparse_bias.tools.plotting import plot_query_bias
from sparse_bias.tools.synthetic import synthetic_scene

QUICK = os.environ.get("SPARSE_BIAS_QUICK") == "1"
OUT = os.environ.get("SPARSE_BIAS_OUT", "examples_out")
os.makedirs(OUT, exist_ok=True)
scene = synthetic_scene(batch_size=1, num_queries=64 if QUICK else 900, config="small" if QUICK else "fusion")

# %% [markdown]
# Pick queries: one seen by two cameras (the overlap of neighbouring views: two camera panels in its row), and
# two seen by one.

# %%
seen_twice = (scene.cam_pos[0, :, 1, 0] >= 0).nonzero().flatten()[:1].tolist()
seen_once = (scene.cam_pos[0, :, 0, 0] >= 0).nonzero().flatten()[:2].tolist()
queries = list(dict.fromkeys(seen_twice + seen_once))
win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, bev_window=15, cam_window=15)
lidar_w = torch.full((1, win.num_queries), 0.8)       # AQR-style weights: trust LiDAR a bit more
camera_w = torch.full((1, win.num_queries), 0.5)

# %%
paths = []
for profile in ("flat", "gaussian"):
    bias = sb.window_bias(win, lidar_w, camera_w, scale=1.0, profile=profile)
    paths.append(plot_query_bias(bias, os.path.join(OUT, f"bias_{profile}.png"), queries=queries,
                                 title=f"{profile} bias, windows 15x15, AQR weights 0.8 (LiDAR) / 0.5 (camera)"))

# %% [markdown]
# Per-head weights: head 0 trusts LiDAR, head 1 the cameras (tanh-range weights may be negative).

# %%
per_head_l = torch.tensor([1.0, -0.5]).expand(1, win.num_queries, 2)
per_head_c = torch.tensor([-0.5, 1.0]).expand(1, win.num_queries, 2)
bias = sb.window_bias(win, per_head_l, per_head_c)
for head in range(2):
    paths.append(plot_query_bias(bias, os.path.join(OUT, f"bias_head{head}.png"), queries=queries, head=head,
                                 title=f"per-head bias, head {head}: LiDAR weight {[1.0, -0.5][head]}, camera "
                                       f"weight {[-0.5, 1.0][head]}"))
print("wrote", *paths, sep="\n  ")
