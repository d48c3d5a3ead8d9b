# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # A small CMT-like model trained end to end with AQR weights and a local bias
#
# The origin design's "CmtHead integration": from the head, one call to `sb.nn.AQRAttentionBias` projects
# the normalised 3D reference points once (BEV cell, first camera view that sees the point), runs the AQR --
# a one-layer PETR decoder whose cross-attention is *window attention* over the memory (MoME's local
# attention mask, no dense `[B * heads, Q, K]` mask) -- and spreads its LiDAR / camera weights over the
# bias windows. The bias goes into `CmtTransformer(..., attention_bias=...)`.
#
# Task: every query must output the sum of the memory features at the BEV cell and the camera cell its
# reference point projects to. Compared with the same model without the bias.
#
# Run: `python examples/cmt_aqr_training.py` (set `SPARSE_BIAS_QUICK=1` for a fast smoke run).

# %%
import os

import torch
from torch import nn

import sparse_bias as sb
from sparse_bias.nn import AQRAttentionBias, CmtTransformer
from sparse_bias.synthetic import synthetic_cameras

QUICK = os.environ.get("SPARSE_BIAS_QUICK") == "1"
OUT = os.environ.get("SPARSE_BIAS_OUT", "examples_out")
STEPS = 40 if QUICK else 300
torch.manual_seed(0)

# %% [markdown]
# Layout: a 16 x 16 BEV grid and six 4 x 10 camera views (400 keys), cameras of a 64 x 160 image on a ring.
# The bias config is the origin design's dict; the AQR config names MoME's window sizes `[camera, bev]`.

# %%
BEV, CAM, IMG = (16, 16), (6, 4, 10), (64, 160)
PC_RANGE = [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
C, HEADS, Q, B = 32, 4, 24, 4
layout = sb.KeyLayout(bev_shape=BEV, cam_shape=CAM)
attention_bias_config = dict(enable=True, window_size=1, bias_scale=8.0, use_local_bias=True, fp16=False,
                             debug_mode=False, bev_feature_shape=BEV, pers_feature_shape=CAM)
aqr_config = dict(embed_dims=C, num_heads=4, feedforward_channels=64, window_sizes=[3, 3], dropout=0.0)
lidar2img = synthetic_cameras(B, img_shape=IMG)


def sample_batch(gen):
    """Features, reference points and the target: the features at the point's BEV cell and camera cell."""
    x = torch.randn(B, C, *BEV, generator=gen)
    x_img = torch.randn(B * CAM[0], C, *CAM[1:], generator=gen)
    ref = torch.rand(B, Q, 3, generator=gen) * 0.6 + 0.2                 # within 32 m of the car
    bev_pos, cam_pos = sb.project_points(ref, PC_RANGE, layout, lidar2img, IMG, max_views=1)
    b = torch.arange(B).unsqueeze(1)
    target = x.permute(0, 2, 3, 1)[b, bev_pos[..., 0], bev_pos[..., 1]]
    view, row, col = cam_pos[:, :, 0].unbind(-1)
    seen = (view >= 0).unsqueeze(-1)
    cam_feat = x_img.view(B, CAM[0], C, *CAM[1:]).permute(0, 1, 3, 4, 2)[b, view.clamp(min=0), row.clamp(min=0),
                                                                          col.clamp(min=0)]
    return x, x_img, ref, target + cam_feat * seen


class TinyCmt(nn.Module):
    """Query embedding from the reference point, AQR + local bias, a 2-layer CmtTransformer, a linear head."""

    def __init__(self, use_bias: bool):
        super().__init__()
        self.query_embed = nn.Sequential(nn.Linear(3, C), nn.ReLU(), nn.Linear(C, C))
        self.bev_pos = nn.Parameter(torch.randn(BEV[0] * BEV[1], C) * 0.1)    # learned key positions
        self.rv_pos = nn.Parameter(torch.randn(*CAM, C) * 0.1)
        self.transformer = CmtTransformer(C, HEADS, num_layers=2, feedforward_channels=64, dropout=0.0)
        self.attention_bias = AQRAttentionBias(attention_bias_config, aqr_config, PC_RANGE) if use_bias else None
        self.head = nn.Linear(C, C)

    def forward(self, x, x_img, ref):
        qe = self.query_embed(ref)                                           # [B, Q, C]
        rv_pos = self.rv_pos.repeat(x.shape[0], 1, 1, 1)
        bias = None
        if self.attention_bias is not None:                                  # one call: project, AQR, bias
            memory, pos = CmtTransformer.flatten_memory(x, x_img, self.bev_pos, rv_pos, x.shape[0])
            bias = self.attention_bias(qe.transpose(0, 1), memory, pos, ref, lidar2img, IMG)
        out_dec, _ = self.transformer(x, x_img, qe, self.bev_pos, rv_pos, attention_bias=bias)
        return self.head(out_dec[-1])                                        # [B, Q, C]


# %% [markdown]
# Train both models on the same batches.

# %%
def train(use_bias: bool):
    torch.manual_seed(0)
    model = TinyCmt(use_bias)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x, x_img, ref, target = sample_batch(gen)
        loss = (model(x, x_img, ref) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


(with_bias, model), (control, _) = train(True), train(False)
curves = {"AQR + sparse bias": with_bias, "no bias (control)": control}


def tail_mean(losses, n=20):
    return sum(losses[-n:]) / len(losses[-n:])


for name, losses in curves.items():
    print(f"{name:18s} loss: first {losses[0]:.3f}, final (mean of last 20 steps) {tail_mean(losses):.3f}")

# %% [markdown]
# The AQR weights after training, and the window attention's share of the memory.

# %%
gen = torch.Generator().manual_seed(2)
x, x_img, ref, _ = sample_batch(gen)
with torch.no_grad():
    qe = model.query_embed(ref)
    rv_pos = model.rv_pos.repeat(B, 1, 1, 1)
    memory, pos = CmtTransformer.flatten_memory(x, x_img, model.bev_pos, rv_pos, B)
    bias, aqr = model.attention_bias(qe.transpose(0, 1), memory, pos, ref, lidar2img, IMG, return_weights=True)
win = aqr.projection.local_window
print(f"AQR weights: lidar mean {aqr.lidar_weights.mean():.3f}, camera mean {aqr.camera_weights.mean():.3f}; "
      f"LAM: {win.nnz / win.num_rows:.1f} of {layout.num_keys} keys per query; bias nnz {bias.index.nnz}")

# %%
os.makedirs(OUT, exist_ok=True)
try:
    from sparse_bias.plotting import plot_losses
    print("curves:", plot_losses(curves, os.path.join(OUT, "cmt_aqr_training.png"),
                                 "AQR + local bias: reading the projected cells"))
except ImportError:  # pragma: no cover - matplotlib is a dev extra
    pass
