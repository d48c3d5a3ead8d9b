# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # The AQR learns which sensor to trust per query: a small CMT-like model under sensor failures
#
# The dense version's "CmtHead integration": from the head, one call to `sb.nn.AQRAttentionBias` projects
# the normalised 3D reference points once (BEV cell, first camera view that sees the point), runs the AQR --
# a one-layer PETR decoder whose cross-attention is *window attention* over the memory (MoME's local
# attention mask, no dense `[B * heads, Q, K]` mask) -- and spreads its LiDAR / camera weights over the
# bias windows: weight `w` puts `8 * w` on the query's cell of that modality. The bias goes into
# `CmtTransformer(..., attention_bias=...)`.
#
# Task: every object is seen by both sensors -- its feature sits at the BEV cell and at the camera cell its
# reference point projects to -- and its query must output that feature. In every sample one sensor
# failure of each kind is simulated, as in MoME's failure cases: the LiDAR drops out over one quadrant of
# the BEV grid (its cells read as the feature of an empty sweep, plus noise) and one camera view drops
# out (its cells read as a black image's feature). A query in the dropped quadrant can only read its
# object from the camera, a query in the dropped view only from the LiDAR. The AQR is told nothing at
# run time: it has to see the failure in its windows and turn the failed modality's weight down to -1
# (a bias of -8 on that cell) and the working one's up to +1.
#
# Training: the task loss plus a routing loss, as MoME supervises its router with the labels of the failures
# it simulates (a cross-entropy over its experts there; here a squared error pulling each weight to +1 where
# its sensor works and -1 where it failed). The example prints the mean weights of the two failure groups as
# training goes, the weights on held-out batches at the end, and the task loss beside the same model without
# the bias. With the task loss alone (`ROUTING_WEIGHT = 0`) these 150 steps are not enough: the weights
# drift below zero for every query and the task loss stays at the control's.
#
# Run: `python examples/cmt_aqr_training.py` (set `SPARSE_BIAS_QUICK=1` for a shorter run,
# `SPARSE_BIAS_SEED` to change the seed).

# %%
import os
import time

import torch
from torch import nn

import sparse_bias as sb
from sparse_bias.nn import AQRAttentionBias, CmtTransformer
from sparse_bias.tools.synthetic import synthetic_cameras

QUICK = os.environ.get("SPARSE_BIAS_QUICK") == "1"
OUT = os.environ.get("SPARSE_BIAS_OUT", "examples_out")
SEED = int(os.environ.get("SPARSE_BIAS_SEED", "0"))
STEPS = 60 if QUICK else 150
REPORT_EVERY = 10 if QUICK else 25
ROUTING_WEIGHT = 0.5
torch.manual_seed(SEED)

# A model this small gains nothing from a second thread, and where other jobs share the cores each parallel region
# of torch's own layers and optimiser waits for a scheduler time slice (docs/benchmarks.md, "Threads on small
# problems"): one thread unless OMP_NUM_THREADS says otherwise.
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
print(f"threads: {torch.get_num_threads()} (set OMP_NUM_THREADS to choose)")

# %% [markdown]
# Layout: a 16 x 16 BEV grid and six 4 x 10 camera views (496 keys), cameras of a 64 x 160 image on a ring.
# The bias config is the dense version's dict; the AQR config names MoME's window sizes `[camera, bev]`.
#
# The AQR's `weight_predictor` is `tanh(Linear(C, 2))` with CMTTEST's initialisation by default (Xavier
# weights, `init_bias=1.5`): its pre-activations spread around 1.5 with a standard deviation above 1, so
# many weights start near +1, where the tanh passes almost no gradient (the next cell counts them). Here
# `init_bias=0` and small predictor weights start every weight near 0, in the tanh's linear range, free to
# move either way.

# %%
BEV, CAM, IMG = (16, 16), (6, 4, 10), (64, 160)
PC_RANGE = [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0]
C, HEADS, Q, B = 32, 4, 24, 4
layout = sb.KeyLayout(bev_shape=BEV, cam_shape=CAM)
attention_bias_config = dict(enable=True, window_size=1, bias_scale=8.0, use_local_bias=True, fp16=False,
                             debug_mode=False, bev_feature_shape=BEV, pers_feature_shape=CAM)
aqr_config = dict(embed_dims=C, num_heads=4, feedforward_channels=64, window_sizes=[3, 3], dropout=0.0,
                  init_bias=0.0)
lidar2img = synthetic_cameras(B, img_shape=IMG)
CLEAN, LIDAR_FAILED, CAMERA_FAILED, UNREADABLE = 0, 1, 2, 3
GROUPS = {"lidar failed": LIDAR_FAILED, "camera failed": CAMERA_FAILED, "both work": CLEAN}
# what a failed sensor's cells read: the feature of an empty LiDAR sweep, of a black camera image
FAILED_FEATURE = torch.randn(2, C, 1, 1, generator=torch.Generator().manual_seed(SEED + 100))


def sample_batch(gen):
    """Features, reference points, each query's sensor state ``[B, Q]`` and the target ``[B, Q, C]``.

    States: `CLEAN`, `LIDAR_FAILED`, `CAMERA_FAILED`, or `UNREADABLE` (no working sensor sees the object:
    both failed, or the LiDAR failed and no camera sees the point), left out of the losses.
    """
    x = torch.randn(B, C, *BEV, generator=gen)
    x_img = torch.randn(B * CAM[0], C, *CAM[1:], generator=gen)
    ref = torch.rand(B, Q, 3, generator=gen) * 0.6 + 0.2                 # within 32 m of the car
    bev_pos, cam_pos = sb.project_points(ref, PC_RANGE, layout, lidar2img, IMG, max_views=1)
    b = torch.arange(B).unsqueeze(1).expand(B, Q)
    row, col = bev_pos.unbind(-1)
    view, cam_row, cam_col = cam_pos[:, :, 0].unbind(-1)
    seen = view >= 0
    target = x[b, :, row, col]                                           # the object's feature  [B, Q, C]
    cams = x_img.view(B, CAM[0], C, *CAM[1:])
    cams[b[seen], view[seen], :, cam_row[seen], cam_col[seen]] = target[seen]   # the camera sees it too
    # one LiDAR quadrant and one camera view drop out per sample
    quadrant = torch.randint(0, 4, (B,), generator=gen)
    dropped_view = torch.randint(0, CAM[0], (B,), generator=gen)
    h, w = BEV[0] // 2, BEV[1] // 2
    for i in range(B):
        r0, c0 = int(quadrant[i]) // 2 * h, int(quadrant[i]) % 2 * w
        x[i, :, r0:r0 + h, c0:c0 + w] = FAILED_FEATURE[0] + 0.3 * torch.randn(C, h, w, generator=gen)
        cams[i, dropped_view[i]] = FAILED_FEATURE[1] + 0.3 * torch.randn(C, *CAM[1:], generator=gen)
    lidar_failed = (row // h) * 2 + col // w == quadrant.unsqueeze(1)
    camera_failed = view == dropped_view.unsqueeze(1)
    state = torch.full((B, Q), CLEAN)
    state[lidar_failed] = LIDAR_FAILED
    state[camera_failed] = CAMERA_FAILED
    state[lidar_failed & (camera_failed | ~seen)] = UNREADABLE
    return x, x_img, ref, state, target


class TinyCmt(nn.Module):
    """Query embedding from the reference point, AQR + local bias, a 2-layer CmtTransformer, a linear head."""

    def __init__(self, use_bias: bool):
        super().__init__()
        self.query_embed = nn.Sequential(nn.Linear(3, C), nn.ReLU(), nn.Linear(C, C))
        self.bev_pos = nn.Parameter(torch.randn(BEV[0] * BEV[1], C) * 0.1)    # learned key positions
        self.rv_pos = nn.Parameter(torch.randn(*CAM, C) * 0.1)
        self.transformer = CmtTransformer(C, HEADS, num_layers=2, feedforward_channels=64, dropout=0.0)
        self.attention_bias = AQRAttentionBias(attention_bias_config, aqr_config, PC_RANGE) if use_bias else None
        if use_bias:                                                         # start in the tanh's linear range
            nn.init.normal_(self.attention_bias.aqr.weight_predictor.weight, std=0.01)
        self.head = nn.Linear(C, C)

    def forward(self, x, x_img, ref):
        """``(prediction [B, Q, C], AQROutput or None)``."""
        qe = self.query_embed(ref)                                           # [B, Q, C]
        rv_pos = self.rv_pos.repeat(x.shape[0], 1, 1, 1)
        bias = aqr = None
        if self.attention_bias is not None:                                  # one call: project, AQR, bias
            memory, pos = CmtTransformer.flatten_memory(x, x_img, self.bev_pos, rv_pos, x.shape[0])
            bias, aqr = self.attention_bias(qe.transpose(0, 1), memory, pos, ref, lidar2img, IMG,
                                            return_weights=True)
        out_dec, _ = self.transformer(x, x_img, qe, self.bev_pos, rv_pos, attention_bias=bias)
        return self.head(out_dec[-1]), aqr


def routing_loss(aqr, state):
    """The router's supervision: each weight towards +1 where its sensor works, -1 where it failed."""
    readable = state != UNREADABLE
    lidar_target = 1.0 - 2.0 * (state == LIDAR_FAILED).float()
    camera_target = 1.0 - 2.0 * (state == CAMERA_FAILED).float()
    return ((aqr.lidar_weights - lidar_target)[readable].square().mean()
            + (aqr.camera_weights - camera_target)[readable].square().mean())


def group_means(lidar, camera, state):
    """``{group: (mean lidar weight, mean camera weight, queries)}`` over the failure groups."""
    return {name: (lidar[state == g].mean().item(), camera[state == g].mean().item(), int((state == g).sum()))
            for name, g in GROUPS.items()}


# %% [markdown]
# The initial weights on one batch: with CMTTEST's initialisation (the library's default) and with this
# example's.

# %%
def initial_weights(model, gen):
    x, x_img, ref, _, _ = sample_batch(gen)
    with torch.no_grad():
        _, aqr = model(x, x_img, ref)
    return torch.stack([aqr.lidar_weights, aqr.camera_weights])


torch.manual_seed(SEED)
default_init = TinyCmt(True)
aqr_defaults = {k: v for k, v in aqr_config.items() if k != "init_bias"}
default_init.attention_bias = AQRAttentionBias(attention_bias_config, aqr_defaults, PC_RANGE)
for name, init_model in (("CMTTEST's init (default)", default_init), ("this example's init", TinyCmt(True))):
    w = initial_weights(init_model, torch.Generator().manual_seed(SEED + 1))
    print(f"initial AQR weights, {name:24s}: mean {w.mean():+.2f}, {(w > 0.99).float().mean():4.0%} above 0.99")


# %% [markdown]
# Train both models on the same batches; the AQR weights of the two failure groups move apart.

# %%
def train(use_bias: bool):
    torch.manual_seed(SEED)
    model = TinyCmt(use_bias)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(SEED + 1)
    losses = []
    for step in range(STEPS):
        x, x_img, ref, state, target = sample_batch(gen)
        pred, aqr = model(x, x_img, ref)
        task = (pred - target)[state != UNREADABLE].square().mean()
        loss = task if aqr is None else task + ROUTING_WEIGHT * routing_loss(aqr, state)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(task.item())
        if aqr is not None and (step % REPORT_EVERY == 0 or step == STEPS - 1):
            means = group_means(aqr.lidar_weights.detach(), aqr.camera_weights.detach(), state)
            print(f"step {step:3d}  task loss {task.item():.3f}  AQR weights (lidar, camera): "
                  + "; ".join(f"{name} {lw:+.2f} {cw:+.2f}" for name, (lw, cw, _) in list(means.items())[:2]))
    return losses, model


start = time.perf_counter()
(with_bias, model), (control, _) = train(True), train(False)
curves = {"AQR + sparse bias": with_bias, "no bias (control)": control}


def tail_mean(losses, n=20):
    return sum(losses[-n:]) / len(losses[-n:])


for name, losses in curves.items():
    print(f"{name:18s} loss: first {losses[0]:.3f}, final (mean of last 20 steps) {tail_mean(losses):.3f}")

# %% [markdown]
# The AQR weights after training on eight batches it has not seen, per group of queries, and the window
# attention's share of the memory.

# %%
gen = torch.Generator().manual_seed(SEED + 2)
lidar, camera, states = [], [], []
with torch.no_grad():
    for _ in range(8):
        x, x_img, ref, state, _ = sample_batch(gen)
        _, aqr = model(x, x_img, ref)
        lidar.append(aqr.lidar_weights)
        camera.append(aqr.camera_weights)
        states.append(state)
for name, (lw, cw, n) in group_means(torch.cat(lidar), torch.cat(camera), torch.cat(states)).items():
    print(f"held-out AQR weights, {name:13s} queries ({n:3d}): lidar {lw:+.3f}, camera {cw:+.3f}")
win = aqr.projection.local_window
print(f"LAM: {win.nnz / win.num_rows:.1f} of {layout.num_keys} keys per query; "
      f"both models trained in {time.perf_counter() - start:.1f} s")

# %%
os.makedirs(OUT, exist_ok=True)
try:
    from sparse_bias.tools.plotting import plot_losses
    print("curves:", plot_losses(curves, os.path.join(OUT, "cmt_aqr_training.png"),
                                 "AQR + local bias under sensor failures: task loss"))
except ImportError:  # pragma: no cover - matplotlib is a dev extra
    pass
