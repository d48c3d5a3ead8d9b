"""`python -m sparse_bias.tools.selftest` in its quick CPU mode, end to end, and its failure exit status."""
import importlib
import json
import subprocess
import sys

import pytest
import torch

import sparse_bias as sb
from sparse_bias.tools.selftest import selftest
from sparse_bias.backends import BACKENDS

selftest_mod = importlib.import_module("sparse_bias.tools.selftest")


def test_quick_cpu_selftest_end_to_end(tmp_path):
    path = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "sparse_bias.tools.selftest", "--quick", "--device", "cpu", "--json",
                          str(path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.splitlines()
    checks = [line for line in lines if line.startswith(("PASS", "FAIL"))]
    report = json.loads(path.read_text())
    assert report["passed"] and len(checks) == len(report["checks"]) > 0
    assert {c["dtype"] for c in report["checks"]} == {"float32", "bfloat16", "float16"}
    assert {c["op"] for c in report["checks"]} == {"correction", "window"}
    cases = {c["case"] for c in report["checks"]}
    assert {"per-head bias", "key padding", "dropout", "window + dropout"} <= cases
    assert {"sdpa", "sparse-auto", "dense-bias", "flex"} <= {r["variant"] for r in report["timing"]}
    assert "nan" not in res.stdout and "result: PASS" in res.stdout
    assert lines[1].startswith("estimate: the whole self-test") and " GB" in lines[1]     # before any work
    assert "\r" not in res.stderr                        # progress as plain lines when stderr is not a terminal


def test_estimates_come_before_each_part_and_progress_goes_to_stderr(monkeypatch, capsys):
    from sparse_bias.tools import cli

    def instant_check(op, backend, case, prob, device, dtype, refs):
        return dict(op=op, backend=backend, dtype=str(dtype).replace("torch.", ""), case=case, passed=True,
                    worst="out", rel_err=0.0, tolerance=1.0, detail="")
    monkeypatch.setattr(selftest_mod, "_check", instant_check)
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_INTERVAL_S", 0.0)
    lines = []
    report = selftest("cpu", ["float32"], quick=True, log=lines.append)
    err = capsys.readouterr().err
    assert report["passed"]
    first = {key: next(i for i, line in enumerate(lines) if line.startswith(key))
             for key in ("estimate: the whole self-test", "estimate: exactness", "PASS", "estimate: timing", "variant")}
    assert first["estimate: the whole self-test"] == 1                   # right after the header
    assert first["estimate: exactness"] < first["PASS"] < first["estimate: timing"] < first["variant"]
    n = len(report["checks"])
    assert f"({n} checks: every backend x 1 dtypes" in lines[first["estimate: exactness"]]
    v = len(selftest_mod._timing_names(torch.device("cpu"), 32, 22384))   # flex where this torch has it
    assert f"{4 * v} steps: {v} variants x 2 passes x (1 warm-up + 1 repeats)" in lines[first["estimate: timing"]]
    assert f"exactness: done, {n}/{n} checks" in err and f"timing: done, {4 * v}/{4 * v} steps" in err


def test_a_failing_backend_fails_the_selftest(monkeypatch, capsys):
    original = BACKENDS["torch"].forward_block

    def faulty(*args):
        original(*args)
        args[-2].mul_(1.01)
    monkeypatch.setattr(BACKENDS["torch"], "forward_block", faulty)
    assert selftest_mod.main(["--quick", "--no-timing", "--dtypes", "float32", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails and all(" torch " in line and "correction" in line for line in fails)
    assert "result: FAIL" in out
    footer = next(line for line in out.splitlines() if line.startswith("result: FAIL"))
    assert "GPU" not in footer and "CPU" in footer and "torch version" in footer      # a CPU run: no GPU model


def test_failure_footer_names_the_device():
    cuda, cpu = selftest_mod._machine_to_report(torch.device("cuda:0"), "H200"), \
        selftest_mod._machine_to_report(torch.device("cpu"), "x86_64")
    assert "GPU model (H200)" in cuda and "driver" in cuda
    assert "GPU" not in cpu and "CPU model (x86_64)" in cpu


def test_function_form_returns_the_report():
    report = selftest("cpu", ["float32"], quick=True, timing=False, log=lambda line: None, progress=False)
    assert report["passed"] and report["timing"] == []


@pytest.mark.parametrize("argv, message", [(["--dtypes", "float8"], "invalid choice"),
                                           (["--device", "gpu7"], "not a device"),
                                           (["--layout", "huge"], "invalid choice")])
def test_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        selftest_mod.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_cli_cuda_without_cuda_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exc:
        selftest_mod.main(["--device", "cuda:0"])
    assert exc.value.code == 2 and "CUDA is not available" in capsys.readouterr().err


def test_selftest_tolerance_admits_a_correct_bfloat16_build():
    from sparse_bias._core.precision import tolerance
    eps = torch.finfo(torch.bfloat16).eps
    # the measured failure: dq 1.60e-2 of its largest value, with the naive error under one rounding step
    assert 1.60e-2 <= tolerance(0.0, 1.0, torch.bfloat16)
    # and it is not loose: a 5-ulp error (a real bug's scale) fails in every low-precision dtype
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        assert tolerance(0.0, 1.0, dtype) < 5 * torch.finfo(dtype).eps or dtype == torch.float32
    assert tolerance(0.0, 1.0, torch.float32) < 2e-5
    assert eps > 0
