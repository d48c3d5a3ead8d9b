"""sparse_bias: exact, memory-light local attention bias for multi-modal 3D-detection transformers.

Each object query attends more strongly to a local window of keys around where its 3D reference point
lands on the BEV grid and on the camera views. The windows are a sparse index set (`WindowIndex`)
and the bias a `SparseBias` on it; ``to_dense()`` gives the dense version's ``[B, Q, K]`` tensor.

The command-line tools (self-test, benchmarks, demo) live in `sparse_bias.tools`, which importing the package
does not load: ``python -m sparse_bias.tools.selftest`` (or ``sparse-bias-selftest``), or
``from sparse_bias.tools.selftest import selftest`` in Python.
"""
from ._core.checks import set_debug_checks
from ._core.selfcheck import self_check_results
from .attention import dense_bias_attention, select_backend, sparse_bias_attention
from .backends import extension_available, torch_scatter_available
from .bias import ModalityBias, SparseBias, window_bias
from .host_sync import count_host_syncs
from .layout import KeyLayout
from .projection import project_points
from .window_attention import select_window_backend, window_attention
from .windows import WindowIndex, local_windows

from . import nn  # noqa: E402  (modules; imported last, they use the functional API)
from .nn.config import build_attention_bias  # noqa: E402

__version__ = "0.2.0"

__all__ = [
    "KeyLayout",
    "WindowIndex",
    "local_windows",
    "project_points",
    "SparseBias",
    "ModalityBias",
    "window_bias",
    "sparse_bias_attention",
    "dense_bias_attention",
    "select_backend",
    "window_attention",
    "select_window_backend",
    "torch_scatter_available",
    "extension_available",
    "self_check_results",
    "build_attention_bias",
    "set_debug_checks",
    "count_host_syncs",
    "nn",
    "__version__",
]
