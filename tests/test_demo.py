"""The demo (`make demo`) in quick mode."""
import os

from sparse_bias import demo


def test_demo_quick(tmp_path, capsys):
    result = demo.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "bias memory" in out and "nnz" in out
    assert result["sparse_bytes"] < result["dense_bytes"]
    assert result["png"] and os.path.getsize(result["png"]) > 10_000
