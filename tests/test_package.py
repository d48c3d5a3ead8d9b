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


def test_tools_keep_their_old_paths():
    """The tools live in ``sparse_bias.tools``; the old public paths are thin entry modules re-exporting them."""
    import importlib

    for name in ("benchmark", "aqr_benchmark", "demo", "plotting", "synthetic", "selftest"):
        old, new = importlib.import_module(f"sparse_bias.{name}"), importlib.import_module(f"sparse_bias.tools.{name}")
        for attr in old.__all__:
            assert getattr(old, attr) is getattr(new, attr), (name, attr)
    assert callable(importlib.import_module("sparse_bias.selftest"))          # sb.selftest(...) either way


def test_console_scripts_load():
    """Each console script names a function that exists (``make install`` reinstalls when setup.cfg changes)."""
    import importlib.metadata

    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
               if ep.name.startswith("sparse-bias-")}
    assert len(scripts) == 4 and all(callable(ep.load()) for ep in scripts.values()), scripts
