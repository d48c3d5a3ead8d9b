import subprocess
import sys

import sparse_bias as sb


def test_flat_namespace():
    for name in sb.__all__:
        assert hasattr(sb, name), name
    for name in ["KeyLayout", "local_windows", "project_points", "window_bias", "SparseBias", "WindowIndex"]:
        assert name in sb.__all__


def test_imports_without_torch_scatter():
    code = ("import sys; sys.modules['torch_scatter'] = None\n"
            "import torch, sparse_bias as sb\n"
            "win = sb.local_windows(sb.KeyLayout(bev_shape=(9, 9)), torch.tensor([[[4, 4]]]), None, 3)\n"
            "assert sb.window_bias(win, torch.ones(1, 1), None).to_dense().sum() == 9\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_package_root_holds_the_public_modules_only():
    """The root holds the public modules; the private core is one package (`sparse_bias._core`), the tools another,
    and importing the package loads neither the tools nor anything that draws from torch's RNG."""
    import pathlib

    root = pathlib.Path(sb.__file__).parent
    files = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("_C"))
    assert files == ["__init__.py", "attention.py", "bias.py", "flex.py", "host_sync.py", "layout.py", "mmcv.py",
                     "profiles.py", "projection.py", "py.typed", "window_attention.py", "windows.py"], files
    code = "import sys, sparse_bias; print(sorted(m for m in sys.modules if m.startswith('sparse_bias.tools')))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]", out


def test_console_scripts_load():
    """Each console script names a function that exists (``make install`` reinstalls when setup.cfg changes)."""
    import importlib.metadata

    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.name.startswith("sparse-bias-")}
    assert len(scripts) == 4 and all(callable(ep.load()) for ep in scripts.values()), scripts
