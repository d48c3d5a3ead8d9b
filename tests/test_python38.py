"""The code stays valid on Python 3.8, the interpreter CMT's and MoME's environments run (no 3.8 here, so checked
statically): 3.8 syntax by ``ast.parse(feature_version=(3, 8))``, and the standard library and built-in features
by `vermin <https://github.com/netromdk/vermin>`_ with annotations counted as evaluated at runtime (PEP 585
generics such as ``list[int]`` fail when a 3.8 ``def`` line runs)."""
import ast
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ["sparse_bias", "tests", "examples", "benchmarks", "setup.py"]


def _files():
    for entry in CODE:
        path = os.path.join(ROOT, entry)
        yield from ([path] if path.endswith(".py") else glob.glob(os.path.join(path, "**", "*.py"), recursive=True))


@pytest.mark.parametrize("path", sorted(os.path.relpath(p, ROOT) for p in _files()))
def test_parses_as_python_3_8(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        ast.parse(f.read(), filename=path, feature_version=(3, 8))


def test_no_python_3_9_features():
    vermin = shutil.which("vermin", path=os.path.dirname(sys.executable)) or shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -e .[dev])")
    done = subprocess.run([vermin, "--target=3.8-", "--eval-annotations", "--violations", "--no-tips", "-q",
                           *[os.path.join(ROOT, entry) for entry in CODE]], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_metadata_states_python_3_8():
    with open(os.path.join(ROOT, "setup.cfg"), encoding="utf-8") as f:
        assert "python_requires = >=3.8" in f.read()
