"""Progress of the tools' long phases (a tqdm bar on a terminal, plain lines elsewhere) and the estimates printed
before them."""
import io
import sys

import pytest
import torch

from sparse_bias.tools import benchmark, cli, estimates


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_off_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    seen = list(cli.progress_bar(range(3), desc="phase", unit="step"))
    err = capsys.readouterr().err
    assert seen == [0, 1, 2] and "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("phase: 1/3 steps (33 %), 0:00 elapsed, about 0:00 left")
    assert lines[-1].startswith("phase: done, 3/3 steps")


def test_plain_lines_are_throttled_and_a_short_phase_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_INTERVAL_S", 3600.0)
    with cli.progress_bar(total=5, desc="phase", unit="step") as bar:
        for _ in range(5):
            bar.update()
    assert capsys.readouterr().err == ""


def test_disabled_is_silent(monkeypatch, capsys):
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    bar = cli.progress_bar(total=2, desc="phase", unit="step", enabled=False)
    bar.update(2)
    bar.close()
    assert bar.disable and capsys.readouterr().err == ""


def test_tqdm_on_a_terminal_and_plain_lines_without_tqdm(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert isinstance(cli.progress_bar(total=2, desc="phase", unit="step"), tqdm.tqdm)
    monkeypatch.setitem(sys.modules, "tqdm", None)                  # tqdm missing: import fails
    assert isinstance(cli.progress_bar(total=2, desc="phase", unit="step"), cli.LineProgress)


def test_worker_steps_reach_a_plain_bar(monkeypatch, capsys):
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    argv = ["--worker", "-", "--mode", "time", "--queries", "8", "--config", "small", "--batch-size", "1",
            "--heads", "2", "--repeats", "1", "--bev-window", "3", "--cam-window", "3",
            "--check-variants", "sdpa,sparse-auto"]
    with cli.progress_bar(desc="timing", unit="step") as bar:
        cli.run_worker("sparse_bias.tools.benchmark", argv, "test worker", bar=bar)
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("timing: done, 8/8 steps")
    assert any(line.startswith("timing: 4/8 steps") for line in lines)


def test_estimates_from_the_shapes():
    assert estimates.format_duration(40) == "40 s" and estimates.format_duration(250) == "4.2 min"
    assert estimates.format_duration(3 * 3600) == "3.0 h"
    dense = estimates.step_gb("dense-bias", 2, 8, 900, 56400)
    assert dense == pytest.approx(11.5, abs=0.1)                         # the measured 10.5 GB, rounded up
    assert estimates.step_gb("sparse-auto", 2, 8, 900, 56400) < 1.5
    threads = torch.get_num_threads()
    fwd_bwd = estimates.step_seconds("sdpa", True, 2, 8, 900, 56400)
    assert fwd_bwd == pytest.approx(2.38 * 2 / threads, rel=0.01)      # docs/results: 2.380 s on 2 threads
    line = estimates.Estimate("timing", "36 steps", 150.0, 11.5).line()
    assert line == f"estimate: timing (36 steps): about 2.5 min on {threads} threads, peak RAM about 11.5 GB"
    assert estimates.Estimate("timing", "", None, 3.0, "GPU memory").line() == (
        "estimate: timing: peak GPU memory about 3.0 GB")


def test_benchmark_phase_estimates_at_the_cmt_shape():
    args = benchmark.parse_args([])
    est = benchmark.phase_estimates(args, ["sdpa", "sparse-auto", "dense-bias"])
    assert set(est) == {"check", "time", "memory", "total"}
    assert "36 steps: 3 variants x 2 passes x (1 warm-up + 5 repeats)" in est["time"].line()
    assert est["total"].gb == pytest.approx(11.5, abs=0.1)
    assert est["total"].seconds == pytest.approx(sum(est[k].seconds for k in ("check", "time", "memory")))
    light = benchmark.phase_estimates(args, ["sdpa", "sparse-auto"])
    assert light["time"].gb < 1.5 and light["memory"].gb < 1.5 and light["total"].seconds < est["total"].seconds
    assert light["check"].gb == est["check"].gb                          # the dense reference at full Q
    args.check_queries = 90
    assert benchmark.phase_estimates(args, ["sdpa", "sparse-auto"])["check"].gb < 2
