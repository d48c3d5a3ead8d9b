# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Quickstart: layout, windows, bias, attention
#
# The whole pipeline on a synthetic CMT scene, checked against the dense reference.
# Run: `python examples/quickstart.py` (`SPARSE_BIAS_QUICK=1` for the small CMT configuration).

# %%
import os

import torch

import sparse_bias as sb
from sparse_bias.tools.synthetic import CMT_CONFIGS, synthetic_cameras

QUICK = os.environ.get("SPARSE_BIAS_QUICK") == "1"
cfg = CMT_CONFIGS["small" if QUICK else "fusion"]
B, Q, H, D = 2, (64 if QUICK else 900), 8, 32
torch.manual_seed(0)

# %% [markdown]
# ## 1. The key layout: BEV keys row-major first, then the six camera views.

# %%
layout = sb.KeyLayout(bev_shape=cfg.bev_shape, cam_shape=cfg.cam_shape)
print(layout)

# %% [markdown]
# ## 2. Project reference points (normalised over `pc_range`) to BEV and camera cells.

# %%
ref_points = torch.rand(B, Q, 3)
ref_points[..., 2] = 0.3 + 0.3 * ref_points[..., 2]                  # near the ground
lidar2img = synthetic_cameras(B, cfg.img_shape)                       # [B, 6, 4, 4]
bev_pos, cam_pos = sb.project_points(ref_points, cfg.pc_range, layout, lidar2img, cfg.img_shape)
print("bev_pos", tuple(bev_pos.shape), "cam_pos", tuple(cam_pos.shape),
      "| seen by a camera:", int((cam_pos[..., 0, 0] >= 0).sum()), "of", B * Q)

# %% [markdown]
# ## 3. Windows (a CSR index set over queries) and the bias values on them.

# %%
win = sb.local_windows(layout, bev_pos, cam_pos, bev_window=15, cam_window=15)
lidar_w, camera_w = torch.rand(B, Q, requires_grad=True), torch.rand(B, Q, requires_grad=True)
bias = sb.window_bias(win, lidar_w, camera_w, scale=1.0)
print(win)
print(bias, f"-> {bias.nbytes() / 2**20:.1f} MiB instead of {B * Q * layout.num_keys * 4 / 2**20:.0f} MiB dense")

# %% [markdown]
# ## 4. Attention: dense flash kernel + exact sparse correction, and the dense reference.
#
# The dense reference materialises `[B, H, Q, K]` scores (several GB at the CMT shape), so it is checked on 32
# sampled queries: the sparse backward gets an upstream gradient on those rows only, which makes every
# gradient (q on those rows, k, v and both weights) comparable with the dense reference on the same rows.
# The script stays under 2 GB of peak RAM.

# %%
q = torch.randn(B, H, Q, D, requires_grad=True)
k = torch.randn(B, H, layout.num_keys, D, requires_grad=True)
v = torch.randn(B, H, layout.num_keys, D, requires_grad=True)
out = sb.sparse_bias_attention(q, k, v, bias)
print("backend:", sb.select_backend(q, bias))

rows = torch.linspace(0, Q - 1, 32).long()                           # the sampled queries
grad = torch.zeros_like(out)
grad[:, :, rows] = torch.randn(B, H, len(rows), D)
grads = torch.autograd.grad(out, (q, k, v, lidar_w, camera_w), grad)
ref = sb.dense_bias_attention(q[:, :, rows], k, v, sb.window_bias(win, lidar_w, camera_w).to_dense(rows))
ref_grads = torch.autograd.grad(ref, (q, k, v, lidar_w, camera_w), grad[:, :, rows])
got = (out[:, :, rows], grads[0][:, :, rows]) + grads[1:]
want = (ref, ref_grads[0][:, :, rows]) + ref_grads[1:]
for name, a, b in zip(["out", "dq", "dk", "dv", "d lidar_w", "d camera_w"], got, want):
    err = float((a - b).detach().abs().max() / b.detach().abs().max())
    print(f"{name:10s} max relative error vs dense reference: {err:.1e}")
    assert err < 1e-4
