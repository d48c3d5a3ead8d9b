"""The demo (`make demo`) in quick mode: its output, its plots, its estimates and progress."""
import io
import os
import sys

from sparse_bias.tools import demo
from sparse_bias.tools import cli


def test_demo_quick(tmp_path, monkeypatch):
    both = io.StringIO()                         # stdout and stderr in one stream: their order is checked
    monkeypatch.setattr(sys, "stdout", both)
    monkeypatch.setattr(sys, "stderr", both)
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_INTERVAL_S", 0.0)      # a progress line at every step
    result = demo.main(["--quick", "--out", str(tmp_path)])
    monkeypatch.undo()
    out = both.getvalue()
    lines = out.splitlines()
    assert "bias memory" in out and "nnz" in out
    assert result["sparse_bytes"] < result["dense_bytes"]
    assert result["png"] and os.path.getsize(result["png"]) > 10_000
    assert os.path.getsize(tmp_path / "attention_comparison.png") > 10_000

    def first(prefix):
        return next(i for i, line in enumerate(lines) if line.lstrip().startswith(prefix))
    # the attention part's cost up front, then each phase's estimate before its progress and its result
    assert first("time        : about ") < first("estimate: exactness check")
    assert first("estimate: exactness check") < first("exactness check: ") < first("exactness vs the dense")
    assert first("estimate: timing") < first("timing (interleaved): ") < first("timed (interleaved")
    assert first("estimate: peak memory") < first("peak memory (a process per variant): ") < first("memory of sdpa")
    estimate = lines[first("estimate: timing")]
    assert "12 steps: 3 variants x 2 passes x (1 warm-up + 1 repeats)" in estimate and " GB" in estimate
    progress = [line for line in lines if line.startswith("timing (interleaved): ")]
    assert progress[-1].startswith("timing (interleaved): done, 12/12 steps")
    assert "\r" not in out                       # plain lines where stderr is not a terminal
