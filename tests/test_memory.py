"""Measured memory: sparse-bias attention costs a small fraction of what the dense-bias version adds.

The 800x320 CMT configuration (BEV 128x128 + 6x20x50 = 22384 keys), 300 queries, 8 heads, B=2, fp32,
forward + backward. Each variant's peak RSS is measured in a fresh subprocess (sparse_bias.tools.benchmark)."""
from sparse_bias.tools import benchmark


def test_sparse_extra_memory_is_a_small_fraction_of_dense():
    args = benchmark.parse_args(["--config", "small", "--queries", "300", "--heads", "8"])
    peak = {name: benchmark._run(args, "memory", name)["peak_rss_mib"] for name in ("sdpa", "sparse-auto", "dense-bias")}
    sparse_extra = peak["sparse-auto"] - peak["sdpa"]
    dense_extra = peak["dense-bias"] - peak["sdpa"]
    assert dense_extra > 500, peak                     # the dense bias and its score buffers: > 0.5 GiB here
    assert sparse_extra < 0.1 * dense_extra, peak
