"""The documentation builds in MkDocs strict mode (API pages generated from the docstrings)."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mkdocs_strict_build(tmp_path):
    pytest.importorskip("mkdocstrings", reason="mkdocs / mkdocstrings are dev extras")
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()
