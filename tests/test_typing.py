"""The files a library ships: type hints on the public API checked by a type checker, ``py.typed``,
one version in the package, setup.cfg, the changelog and the git tag, and the license."""
import configparser
import inspect
import pathlib
import re
import subprocess
import sys

import pytest

import sparse_bias as sb
import sparse_bias.nn as sbnn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _missing_annotations(fn):
    sig = inspect.signature(fn)
    params = [p for p, v in sig.parameters.items()
              if v.annotation is inspect.Parameter.empty and p not in ("self", "cls")
              and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    return params + (["return"] if sig.return_annotation is inspect.Signature.empty else [])


def test_public_functions_and_module_forwards_are_annotated():
    missing = {}
    for name in sb.__all__:
        obj = getattr(sb, name)
        if inspect.isfunction(obj) and _missing_annotations(obj):
            missing[name] = _missing_annotations(obj)
    for name in sbnn.__all__:
        obj = getattr(sbnn, name)
        if inspect.isclass(obj) and "forward" in vars(obj) and _missing_annotations(obj.forward):
            missing[f"nn.{name}.forward"] = _missing_annotations(obj.forward)
    assert not missing, missing


def test_the_package_is_marked_typed():
    assert (ROOT / "sparse_bias" / "py.typed").exists()
    assert "py.typed" in (ROOT / "setup.py").read_text()


def test_mypy_accepts_the_public_api_as_users_call_it():
    pytest.importorskip("mypy", reason="mypy is a dev extra")
    res = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                          "--no-incremental", str(ROOT / "tests" / "typing_usage.py")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_one_version_everywhere():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["version"] == sb.__version__
    top = re.search(r"^## (\d+\.\d+\.\d+)", (ROOT / "CHANGELOG.md").read_text(), re.M).group(1)
    assert top == sb.__version__
    cff = re.search(r"^version: (\S+)", (ROOT / "CITATION.cff").read_text(), re.M).group(1)
    assert cff == sb.__version__


def test_the_newest_release_tag_is_this_version():
    try:
        tags = subprocess.run(["git", "tag", "--list", "v*", "--sort=-v:refname"], capture_output=True, text=True,
                              cwd=ROOT, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        tags = []
    if not tags:
        pytest.skip("no release tags in this checkout (a shallow or exported copy)")
    assert tags[0] == f"v{sb.__version__}"


def test_license_matches_the_metadata():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
