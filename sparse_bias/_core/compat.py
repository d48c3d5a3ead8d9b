"""What the installed torch offers, probed by feature (never by version string), and the fallbacks used where a
feature is absent. The library runs on torch 2.0 and newer (docs/install.md, "Support matrix"):

* ``CUSTOM_OPS``: ``torch.library.custom_op`` / ``register_fake`` (torch 2.4+). Without
  them the attention ops run as eager ``autograd.Function`` s with the same implementation, and
  the dynamo of those releases cannot trace them (compile the model with the attention call excluded);
* `is_compiling` / `is_exporting`: ``torch.compiler``'s (2.3+ / 2.5+), else ``torch._dynamo``'s when dynamo is
  already imported (it never is imported here), else False (``EXPORT_FLAG``: whether ``torch.compiler`` can tell);
* `custom_op`: ``torch.library``'s where it has it; otherwise the decorated function stays a plain Python function
  (``register_fake`` a no-op) and nothing is registered;
* `custom_op_definitions`: the registry of ``torch.library.custom_op`` ops (empty without them);
* `not_traced`: ``torch.compiler.disable`` without importing dynamo here (through ``torch._compile``'s lazy
  ``_disable_dynamo``, 2.1+; without it the function stays as it is);
* `autocast_dtype`: the dtype autocast casts to on a device type, or None where it is off (the device-type
  ``torch.is_autocast_enabled`` / ``get_autocast_dtype`` of 2.4+, else the per-device functions of 2.0).
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Dict

import torch

__all__ = ["CUSTOM_OPS", "EXPORT_FLAG", "is_compiling", "is_exporting", "custom_op", "custom_op_definitions",
           "not_traced", "autocast_dtype"]

#: torch.library's Python custom-op API (torch 2.4+)
CUSTOM_OPS = all(hasattr(torch.library, name) for name in ("custom_op", "register_fake"))


_COMPILER = getattr(torch, "compiler", None)
_IS_COMPILING = getattr(_COMPILER, "is_compiling", None)
_IS_EXPORTING = getattr(_COMPILER, "is_exporting", None)


def _dynamo_flag(name: str) -> bool:
    """``torch._dynamo.<name>()`` on a torch whose ``torch.compiler`` lacks it; False while dynamo is not imported
    (then nothing can be compiling)."""
    dynamo = sys.modules.get("torch._dynamo")
    fn = getattr(dynamo, name, None) if dynamo is not None else None
    return bool(fn()) if fn is not None else False


def is_compiling() -> bool:
    """True while ``torch.compile`` traces the caller."""
    return _IS_COMPILING() if _IS_COMPILING is not None else _dynamo_flag("is_compiling")


#: ``torch.compiler.is_exporting`` (2.5+); without it (nor dynamo's) an exported forward that builds a
#: `WindowIndex` tries to validate it and fails to trace
EXPORT_FLAG = _IS_EXPORTING is not None


def is_exporting() -> bool:
    """True while ``torch.export`` traces the caller."""
    return _IS_EXPORTING() if _IS_EXPORTING is not None else _dynamo_flag("is_exporting")


try:        # ``torch.compiler.disable`` importing dynamo when the function is first called (torch 2.1+)
    from torch._compile import _disable_dynamo as _LAZY_DISABLE
except ImportError:
    _LAZY_DISABLE = None


def not_traced(reason: str) -> Callable[[Callable], Callable]:
    """Decorator: the function runs outside ``torch.compile``'s tracing (``torch.compiler.disable``).

    A call from a compiled region breaks the user's graph there, once and quietly (no warning: dynamo logs it
    under ``TORCH_LOGS=graph_breaks``), and runs the function eagerly; nothing inside it is traced, so its
    data-dependent checks never show up as graph breaks of their own. Under ``fullgraph=True`` dynamo refuses
    the call with an ``Unsupported`` error naming the function (and, from torch 2.8, quoting ``reason``). Dynamo is not imported here: until
    something imports it, nothing can be compiling and the function is called directly. Without
    ``torch._compile._disable_dynamo`` (torch 2.0) the function is returned as it is."""
    def wrap(fn: Callable) -> Callable:
        if _LAZY_DISABLE is None:
            return fn
        disabled = _LAZY_DISABLE(fn)

        @functools.wraps(fn)
        def outside_compile(*args, **kwargs):
            if "torch._dynamo" not in sys.modules:       # no dynamo: nothing is compiling
                return fn(*args, **kwargs)
            return disabled(*args, **kwargs)
        # Dynamo does not inline a function carrying these: it breaks the graph at the call (or, with
        # fullgraph=True, raises Unsupported quoting the message).
        outside_compile._torchdynamo_disable = True
        outside_compile._torchdynamo_disable_msg = reason
        return outside_compile
    return wrap


class _Unregistered:
    """A would-be custom op on a torch without ``torch.library.custom_op``: the function itself."""

    def __init__(self, fn: Callable):
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        return self._fn(*args, **kwargs)

    def register_fake(self, fn: Callable) -> Callable:
        return fn


def custom_op(name: str, mutates_args=()) -> Callable:
    """``torch.library.custom_op(name, mutates_args=...)``, or a decorator leaving the function unregistered."""
    if CUSTOM_OPS:
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return _Unregistered


def custom_op_definitions() -> Dict[str, object]:
    """``{qualified name: definition}`` of the ops ``torch.library.custom_op`` registered (empty before 2.4)."""
    if not CUSTOM_OPS:
        return {}
    from torch._library.custom_ops import OPDEFS
    return OPDEFS


def autocast_dtype(device_type: str):
    """The dtype ``torch.autocast`` casts eligible (float32 / half) tensors to on ``device_type``, or None when
    autocast is off there (or the device type has none)."""
    if hasattr(torch, "get_autocast_dtype"):                                  # the device-type API (2.4+)
        try:
            return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        except (RuntimeError, TypeError, ValueError):                          # a device type without autocast
            return None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    if device_type == "cuda":
        return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
    return None
