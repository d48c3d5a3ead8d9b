"""The install story in a user's own environment.

A plain ``pip install`` builds the wheel in an isolated environment without torch, so the wheel has no
``sparse_bias._C``; the package then compiles the kernels on first use (`sparse_bias._core.extension`) against the
user's torch, or says why not, naming the command that builds them and the backend that runs instead.

Fast tests drive `sparse_bias._core.extension` with monkeypatching; the slow one installs the package into a fresh
virtualenv (its own torch from the local wheel, no view of the development venv) and runs it there.
"""
import glob
import logging
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

import sparse_bias
from sparse_bias._core import extension as _extension

from helpers import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = ("pip install --no-build-isolation -e .",)


@pytest.fixture
def without_installed_kernels(monkeypatch, tmp_path):
    """As after a plain ``pip install``: ``sparse_bias._C`` cannot be imported; the JIT cache is empty."""
    monkeypatch.setitem(sys.modules, "sparse_bias._C", None)      # `from . import _C` raises ImportError
    monkeypatch.delattr(sparse_bias, "_C", raising=False)
    monkeypatch.delenv("SPARSE_BIAS_NO_EXT", raising=False)
    monkeypatch.delenv("SPARSE_BIAS_JIT", raising=False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch_extensions"))
    calls = []

    def fake_load(**kwargs):
        calls.append(kwargs)
        return "compiled-module"

    from torch.utils import cpp_extension
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    return calls


def assert_names_fix_and_fallback(why):
    for cmd in FIX:
        assert f"`{cmd}`" in why, why
    assert "`sparse`" in why and "run instead" in why, why
    assert "make install" not in why, why


def test_extension_jit_opt_out_names_the_fix(without_installed_kernels, monkeypatch):
    for value in ("0", "false", "off"):
        monkeypatch.setenv("SPARSE_BIAS_JIT", value)
        module, why = _extension._load()
        assert module is None and f"SPARSE_BIAS_JIT={value}" in why, why
        assert_names_fix_and_fallback(why)
    assert without_installed_kernels == []                      # nothing compiled


def test_extension_no_ext_disables_the_jit_too(without_installed_kernels, monkeypatch):
    monkeypatch.setenv("SPARSE_BIAS_NO_EXT", "1")
    module, why = _extension._load()
    assert module is None and why.startswith("disabled by SPARSE_BIAS_NO_EXT=1") and "`sparse`" in why, why
    assert without_installed_kernels == []


def test_extension_without_a_compiler(without_installed_kernels, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    module, why = _extension._load()
    assert module is None and "no C++ compiler (`no-such-c++-compiler`)" in why, why
    assert_names_fix_and_fallback(why)
    assert without_installed_kernels == []


def test_extension_failed_compile(without_installed_kernels, monkeypatch, caplog):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'sparse_bias_C_x'\n" + "compiler output\n" * 100)

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with caplog.at_level(logging.WARNING, logger="sparse_bias"):
        module, why = _extension._load()
    assert module is None, why
    assert "compiling them on first use failed (RuntimeError: Error building extension 'sparse_bias_C_x' ...)" in why
    assert "compiler output" not in why                         # the first line only; the log has it in full
    assert_names_fix_and_fallback(why)
    assert [r.getMessage() for r in caplog.records if "first use failed" in r.getMessage()] == [f"sparse_bias: {why}"]


def test_extension_jit_compiles_once_with_the_setup_flags(without_installed_kernels, caplog, tmp_path):
    with caplog.at_level(logging.DEBUG, logger="sparse_bias"):
        module, why = _extension._load()
    assert module == "compiled-module" and "compiled on first use" in why, why
    [kw] = without_installed_kernels
    assert kw["extra_cflags"] == list(_extension.EXTRA_COMPILE_ARGS)
    assert kw["extra_ldflags"] == list(_extension.EXTRA_LINK_ARGS)
    assert kw["with_cuda"] is False and kw["name"].startswith("sparse_bias_C_")
    assert [os.path.relpath(s, _extension._PACKAGE_DIR) for s in kw["sources"]] == list(_extension.SOURCES)
    assert kw["build_directory"] == str(tmp_path / "torch_extensions" / kw["name"])
    compiling = [r for r in caplog.records if "compiling the fused CPU kernels" in r.getMessage()]
    assert len(compiling) == 1 and compiling[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r not in compiling]
    # a cached build: no "compiling" line
    open(os.path.join(kw["build_directory"], kw["name"] + ".so"), "w").close()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="sparse_bias"):
        assert _extension._load()[0] == "compiled-module"
    assert not [r for r in caplog.records if "compiling" in r.getMessage()]


def test_extension_cache_key_follows_torch_and_sources():
    assert _extension._jit_name("2.13.0") != _extension._jit_name("2.14.0")
    assert re.fullmatch(r"sparse_bias_C_[0-9a-f]{12}", _extension._jit_name("2.13.0"))
    csrc = os.path.join(ROOT, "sparse_bias", "csrc")
    shipped = sorted(f"csrc/{f}" for f in os.listdir(csrc) if f.endswith((".cpp", ".h")))
    assert shipped == sorted(_extension.SOURCES + _extension.HEADERS)   # every header is in the cache key


def test_setup_builds_and_ships_what_the_jit_compiles():
    text = open(os.path.join(ROOT, "setup.py")).read()
    assert "spec.SOURCES" in text and "spec.EXTRA_COMPILE_ARGS" in text and "spec.EXTRA_LINK_ARGS" in text
    assert '"csrc/*.cpp", "csrc/*.h"' in text


def test_install_import_compiles_nothing():
    """Importing the package (and asking for the backends' list) neither compiles nor loads the kernels."""
    out = run_python("""
        import sys
        sys.modules["sparse_bias._C"] = None
        import sparse_bias, sparse_bias._core.extension as e
        print("cached" if e._cache else "lazy")
    """)
    assert out.strip() == "lazy"


# ---- the fresh-venv story ---------------------------------------------------------------------------------------

def _local_torch_wheel():
    """The torch wheel of the development venv's version on local disk (pip's find-links), or None: the slow
    test never downloads torch (PyPI's default torch would pull several GB of CUDA packages)."""
    import torch
    version = torch.__version__.split("+")[0]
    dirs = os.environ.get("SPARSE_BIAS_TORCH_WHEELS", os.environ.get("PIP_FIND_LINKS", "/opt/wheels")).split()
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    for d in dirs:
        found = sorted(glob.glob(os.path.join(d, f"torch-{version}*-{tag}-*.whl")))
        if found:
            return found[0]
    return None


def _run(cmd, timings=None, label=None, **kw):
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)
    if timings is not None:
        timings[label] = time.perf_counter() - start
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


USE = r"""
import logging, time, torch, sparse_bias as sb
from sparse_bias._core.extension import extension
assert "site-packages" in sb.__file__, sb.__file__
layout = sb.KeyLayout(bev_shape=(6, 6))
win = sb.local_windows(layout, torch.tensor([[[2, 2], [4, 5]]]), None, 3)
bias = sb.window_bias(win, torch.tensor([[1.0, -1.0]], dtype=torch.float64), None)
q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64) for n in (2, 36, 36))
start = time.perf_counter()
out = sb.sparse_bias_attention(q, k, v, bias)
first = time.perf_counter() - start
assert torch.allclose(out, sb.dense_bias_attention(q, k, v, bias.to_dense()))
name, why = sb.select_backend(q, bias)
print(f"available={sb.extension_available()} backend={name} first_call={first:.1f}")
print("why=" + extension()[1])
"""


@pytest.mark.slow
def test_install_into_a_fresh_venv_compiles_the_kernels_on_first_use(tmp_path):
    wheel = _local_torch_wheel()
    if wheel is None:
        pytest.skip("no local torch wheel (set SPARSE_BIAS_TORCH_WHEELS to its folder)")
    timings = {}
    # the package's source as a user's checkout has it: no built extension, no build folders
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "*.so", "__pycache__", ".pytest_cache", "demo_out", "results"))
    venv, run_dir = tmp_path / "venv", tmp_path / "run"
    run_dir.mkdir()
    py = str(venv / "bin" / "python")
    base = getattr(sys, "_base_executable", sys.executable)
    _run([base, "-m", "venv", str(venv)], timings, "venv")
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SPARSE_BIAS_NO_EXT",
                                                             "SPARSE_BIAS_JIT", "CXX")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"), PATH=f"{venv / 'bin'}:{env['PATH']}")
    assert subprocess.run([py, "-c", "import torch"], capture_output=True, cwd=run_dir, env=env).returncode != 0
    _run([py, "-m", "pip", "install", "--quiet", wheel], timings, "pip install torch", env=env)
    res = _run([py, "-m", "pip", "install", "-v", str(src)], timings, "pip install package", env=env, cwd=run_dir)
    assert "fused CPU kernels (sparse_bias._C) are not built now" in res.stdout + res.stderr
    site = _run([py, "-c", "import sparse_bias, os; print(os.path.dirname(sparse_bias.__file__))"],
                env=dict(env, SPARSE_BIAS_JIT="0"), cwd=run_dir).stdout.strip()
    assert not glob.glob(os.path.join(site, "_C*.so"))                           # a pure-Python wheel ...
    assert os.path.isfile(os.path.join(site, "csrc", "window_terms.cpp"))       # ... with the kernel sources

    # opted out: the pure-PyTorch backend runs, and the reason names the fix
    res = _run([py, "-c", USE], timings, "run, JIT off", env=dict(env, SPARSE_BIAS_JIT="0"), cwd=run_dir)
    assert "available=False backend=sparse" in res.stdout, res.stdout
    for cmd in FIX:
        assert cmd in res.stdout, res.stdout
    assert "compiling" not in res.stderr, res.stderr
    # no compiler: the same, with the reason
    res = _run([py, "-c", USE], env=dict(env, CXX="no-such-c++-compiler"), cwd=run_dir)
    assert "available=False backend=sparse" in res.stdout and "no C++ compiler" in res.stdout, res.stdout
    # first use compiles the kernels (one log line on stderr), against the venv's torch
    res = _run([py, "-c", USE], timings, "first use (JIT compile)", env=env, cwd=run_dir)
    assert "available=True backend=fused" in res.stdout and "compiled on first use" in res.stdout, res.stdout
    assert res.stderr.count("compiling the fused CPU kernels") == 1, res.stderr
    # the next process loads the cached build
    res = _run([py, "-c", USE], timings, "second use (cached)", env=env, cwd=run_dir)
    assert "available=True backend=fused" in res.stdout and "compiling" not in res.stderr, res.stderr
    print("\nfresh-venv timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
