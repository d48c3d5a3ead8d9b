# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # Memory and speed against the dense version
#
# At the CMT fusion shape (B=2, H=8, D=32, Q=900, K=56400, windows 15/15, fp32, forward + backward):
# unbiased SDPA (the floor), sparse-bias attention (`auto` backend) and the dense version's bias
# added to `scaled_dot_product_attention`. Each variant's peak memory comes from a fresh process; times
# are interleaved in one process. Takes a few minutes (`SPARSE_BIAS_QUICK=1`: seconds, tiny sizes).

# %%
import os

from sparse_bias.tools import benchmark

QUICK = os.environ.get("SPARSE_BIAS_QUICK") == "1"
OUT = os.environ.get("SPARSE_BIAS_OUT", "examples_out")
os.makedirs(OUT, exist_ok=True)
argv = ["--variants", "sdpa", "sparse-auto", "dense-bias"] + (["--quick"] if QUICK else [])
rows = benchmark.main(argv)

# %%
try:
    from sparse_bias.tools.plotting import plot_comparison
    print("plot:", plot_comparison(rows, os.path.join(OUT, "memory_and_speed.png")))
except ImportError:  # pragma: no cover - matplotlib is a dev extra
    pass
