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
