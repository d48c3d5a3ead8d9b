"""sparse_bias: exact, memory-light local attention bias for multi-modal 3D-detection transformers.

Each object query attends more strongly to a local window of keys around where its 3D reference point
lands on the BEV grid and on the camera views. The windows are a sparse index set (:class:`WindowIndex`)
and the bias a :class:`SparseBias` on it; ``to_dense()`` gives the origin design's dense tensor.
"""
from .bias import SparseBias, window_bias
from .layout import KeyLayout
from .projection import project_points
from .windows import WindowIndex, local_windows

__version__ = "0.1.0"

__all__ = [
    "KeyLayout",
    "WindowIndex",
    "local_windows",
    "project_points",
    "SparseBias",
    "window_bias",
    "__version__",
]
