# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Plugging sparse bias into a CMT-style decoder
#
# The dense version's `attention_bias_config` builds an `AttentionBiasGenerator`; an `MLPWeightGenerator`
# turns query features into per-query LiDAR / camera weights; the bias reaches the cross-attention of a
# `CmtTransformer`. We train it briefly on a synthetic task where every query must read the memory
# features at the cells its reference point projects to, and compare with the same model without bias.
#
# Run: `python examples/cmt_decoder_training.py` (set `SPARSE_BIAS_QUICK=1` for a fast smoke run).

# %%
import os

import torch
from torch import nn

import sparse_bias as sb
from sparse_bias.nn import CmtTransformer, MLPWeightGenerator

QUICK = os.environ.get("SPARSE_BIAS_QUICK") == "1"
OUT = os.environ.get("SPARSE_BIAS_OUT", "examples_out")
STEPS = 40 if QUICK else 300
torch.manual_seed(0)

# A model this small gains nothing from a second thread, and where other jobs share the cores each parallel region
# of torch's own layers and optimiser waits for a scheduler time slice (docs/benchmarks.md, "Threads on small
# problems"): one thread unless OMP_NUM_THREADS says otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
print(f"threads: {torch.get_num_threads()} (set OMP_NUM_THREADS to choose)")

# %% [markdown]
# A small CMT-like layout: a 16 x 16 BEV grid and two 6 x 8 camera views (352 keys). The bias uses a
# one-cell window (the projected cell itself) and scale 8, so each query starts out looking at its cells.

# %%
layout = sb.KeyLayout(bev_shape=(16, 16), cam_shape=(2, 6, 8))
C, HEADS, Q, B = 32, 4, 24, 8
config = dict(enable=True, window_size=1, bias_scale=8.0, use_local_bias=True, fp16=False, debug_mode=False,
              bev_feature_shape=layout.bev_shape, pers_feature_shape=layout.cam_shape)


def sample_batch(gen):
    """Memory features, query cells and the target: the sum of the features at the query's BEV and camera cell."""
    x = torch.randn(B, C, 16, 16, generator=gen)
    x_img = torch.randn(B * 2, C, 6, 8, generator=gen)
    bev_pos = torch.stack([torch.randint(0, 16, (B, Q), generator=gen), torch.randint(0, 16, (B, Q), generator=gen)], -1)
    cam_pos = torch.stack([torch.randint(0, 2, (B, Q), generator=gen), torch.randint(0, 6, (B, Q), generator=gen),
                           torch.randint(0, 8, (B, Q), generator=gen)], -1)
    b = torch.arange(B).unsqueeze(1)
    target = (x.permute(0, 2, 3, 1)[b, bev_pos[..., 0], bev_pos[..., 1]]
              + x_img.view(B, 2, C, 6, 8).permute(0, 1, 3, 4, 2)[b, cam_pos[..., 0], cam_pos[..., 1], cam_pos[..., 2]])
    return x, x_img, bev_pos, cam_pos, target


class TinyCmt(nn.Module):
    """Query embedding from the query's cells, a 2-layer CmtTransformer, a linear head."""

    def __init__(self, use_bias: bool):
        super().__init__()
        self.query_embed = nn.Sequential(nn.Linear(5, C), nn.ReLU(), nn.Linear(C, C))
        self.bev_pos = nn.Parameter(torch.randn(256, C) * 0.1)              # learned key positions
        self.rv_pos = nn.Parameter(torch.randn(2, 6, 8, C) * 0.1)
        self.transformer = CmtTransformer(C, HEADS, num_layers=2, feedforward_channels=64, dropout=0.0)
        self.aqr = MLPWeightGenerator(C, batch_first=True)
        self.bias_generator = sb.build_attention_bias(config) if use_bias else None
        self.head = nn.Linear(C, C)

    def forward(self, x, x_img, bev_pos, cam_pos):
        cells = torch.cat([bev_pos / 16.0, cam_pos.float() / torch.tensor([2.0, 6.0, 8.0])], -1)
        qe = self.query_embed(cells)                                        # [B, Q, C]
        bias = None
        if self.bias_generator is not None:
            lidar_w, camera_w = self.aqr(qe)
            bias = self.bias_generator(lidar_w, camera_w, bev_pos, cam_pos)
        rv_pos = self.rv_pos.repeat(x.shape[0], 1, 1, 1)
        out_dec, _ = self.transformer(x, x_img, qe, self.bev_pos, rv_pos, attention_bias=bias)
        return self.head(out_dec[-1])                                       # [B, Q, C]


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
        x, x_img, bev_pos, cam_pos, target = sample_batch(gen)
        loss = (model(x, x_img, bev_pos, cam_pos) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


curves = {"sparse bias": train(True), "no bias (control)": train(False)}


def tail_mean(losses, n=20):
    return sum(losses[-n:]) / len(losses[-n:])


for name, losses in curves.items():
    print(f"{name:18s} loss: first {losses[0]:.3f}, final (mean of last 20 steps) {tail_mean(losses):.3f}")

# %%
os.makedirs(OUT, exist_ok=True)
try:
    from sparse_bias.tools.plotting import plot_losses
    print("curves:", plot_losses(curves, os.path.join(OUT, "cmt_decoder_training.png"),
                                 "reading the features at the projected cells"))
except ImportError:  # pragma: no cover - matplotlib is a dev extra
    pass
