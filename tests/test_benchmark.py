"""The benchmark in its quick (dry-run) mode: every variant runs, is checked, and is tabulated."""
from sparse_bias import benchmark


def test_benchmark_quick(capsys):
    rows = benchmark.main(["--quick"])
    out = capsys.readouterr().out
    names = [r["variant"] for r in rows]
    assert names[0] == "sdpa" and names[-1] == "dense-bias" and "sparse-auto" in names
    assert all(r["max_rel_error"] < benchmark.CHECK_TOLERANCE for r in rows if r["variant"] != "sdpa")
    assert "x sdpa" in out and "exactness" in out


def test_sweep_quick(tmp_path):
    rows = benchmark.main(["--quick", "--sweep", "--out", str(tmp_path), "--variants", "sdpa", "sparse-auto"])
    assert {r["swept"] for r in rows} == {"queries", "window", "layout"}
    assert {r["pass_"] for r in rows} == {"forward", "forward+backward"}
    for name in ("sweep.csv", "sweep.json", "sweep_queries.png", "sweep_window.png", "sweep_layout.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_aqr_benchmark_quick(capsys, tmp_path):
    from sparse_bias import aqr_benchmark
    result = aqr_benchmark.main(["--quick", "--json", str(tmp_path / "aqr.json")])
    out = capsys.readouterr().out
    assert [r["variant"] for r in result["rows"]] == list(aqr_benchmark.VARIANTS)
    assert result["check"]["max_rel_error"] < aqr_benchmark.CHECK_TOLERANCE
    assert "x lam-mask" in out and "window_attention alone" in out
    assert (tmp_path / "aqr.json").stat().st_size > 0
