# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Adaptive windows: a window size per query
#
# The dense version's option D ("ideal but hard to vectorise"): size each query's window from its
# predicted object class. `local_windows` takes a LongTensor `[B, Q]` of odd sizes (0 = no window) and stays
# fully vectorised. Sizes from the dense version's table (BEV cells of 0.6 m).

# %%
import os
import time

import torch

import sparse_bias as sb
from sparse_bias.tools.synthetic import synthetic_scene

QUICK = os.environ.get("SPARSE_BIAS_QUICK") == "1"
OUT = os.environ.get("SPARSE_BIAS_OUT", "examples_out")
os.makedirs(OUT, exist_ok=True)

WINDOW = {"car": 11, "bus/trailer": 25, "pedestrian": 5, "barrier": 11, "bicycle": 7}
classes = list(WINDOW)
scene = synthetic_scene(batch_size=2, num_queries=64 if QUICK else 900, config="small" if QUICK else "fusion")
B, Q = scene.bev_pos.shape[:2]

# %% [markdown]
# A stand-in for the detector's class prediction: random class probabilities per query.

# %%
gen = torch.Generator().manual_seed(0)
class_probs = torch.softmax(3 * torch.randn(B, Q, len(classes), generator=gen), dim=-1)
predicted = class_probs.argmax(-1)                                   # [B, Q]
sizes = torch.tensor([WINDOW[c] for c in classes])[predicted]        # [B, Q] odd window sizes
start = time.perf_counter()
win = sb.local_windows(scene.layout, scene.bev_pos, scene.cam_pos, bev_window=sizes, cam_window=15)
elapsed = time.perf_counter() - start
counts = win.counts()
for i, name in enumerate(classes):
    sel = predicted == i
    if sel.any():
        print(f"{name:12s} window {WINDOW[name]:2d}: {int(sel.sum()):4d} queries, "
              f"{float(counts[sel].float().mean()):6.1f} keys per query on average")
print(f"built {win.nnz} entries in {elapsed * 1e3:.1f} ms")

# %% [markdown]
# The bias and the attention work the same with adaptive windows; check against the dense reference.

# %%
bias = sb.window_bias(win, torch.rand(B, Q, generator=gen), torch.rand(B, Q, generator=gen), profile="gaussian")
q = torch.randn(B, 8, Q, 32, generator=gen)
k, v = (torch.randn(B, 8, scene.layout.num_keys, 32, generator=gen) for _ in range(2))
out = sb.sparse_bias_attention(q, k, v, bias)
qs = torch.arange(0, Q, max(Q // 16, 1))                              # a sample of queries for the reference
ref = sb.dense_bias_attention(q[:, :, qs], k, v, bias.to_dense(qs))
err = float((out[:, :, qs] - ref).abs().max())
print(f"max |sparse - dense| on {qs.numel()} sampled queries: {err:.1e}")
assert err < 1e-4

# %%
try:
    from sparse_bias.tools.plotting import plot_query_bias
    picks = [int((predicted[0] == i).nonzero()[0]) for i in range(len(classes)) if (predicted[0] == i).any()][:3]
    path = plot_query_bias(bias, os.path.join(OUT, "adaptive_windows.png"), queries=picks,
                           title="adaptive windows: " + ", ".join(classes[int(predicted[0, p])] for p in picks))
    print("plot:", path)
except ImportError:  # pragma: no cover
    pass
