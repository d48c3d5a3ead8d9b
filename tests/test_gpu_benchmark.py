"""The GPU benchmark script runs unchanged: a dry run on the CPU with tiny sizes (Triton interpreted)."""
import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_benchmark.py"


def test_gpu_benchmark_dry_run(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sparse-sparse" in res.stdout and "dense-bias" in res.stdout
    assert "nan" not in res.stdout                       # no allocator statistics on CPU: "-", not nan
    assert (tmp_path / "rows.json").stat().st_size > 0
