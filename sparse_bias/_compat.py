"""What the installed torch offers, probed by feature (never by version string), and the fallbacks used where a
feature is absent. The library runs on torch 2.0 and newer (docs/install.md, "Support matrix"):

* ``CUSTOM_OPS``: ``torch.library.custom_op`` / ``register_fake`` / ``register_autograd`` (torch 2.4+). Without
  them the attention ops run as eager ``autograd.Function`` s with the same implementation, and
  the dynamo of those releases cannot trace them (compile the model with the attention call excluded);
* `is_compiling` / `is_exporting`: ``torch.compiler``'s (2.3+ / 2.5+), else ``torch._dynamo``'s when dynamo is
  already imported (it never is imported here), else False (``EXPORT_FLAG``: whether ``torch.compiler`` can tell);
* `custom_op` / `register_autograd`: ``torch.library``'s where it has them; otherwise the decorated function stays a
  plain Python function (``register_fake`` a no-op) and nothing is registered;
* `custom_op_definitions`: the registry of ``torch.library.custom_op`` ops (empty without them).
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Dict

import torch

__all__ = ["CUSTOM_OPS", "EXPORT_FLAG", "is_compiling", "is_exporting", "custom_op", "register_autograd",
           "custom_op_definitions"]

#: torch.library's Python custom-op API (torch 2.4+)
CUSTOM_OPS = all(hasattr(torch.library, name) for name in ("custom_op", "register_fake", "register_autograd"))


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


def register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd``, or nothing without custom ops."""
    if CUSTOM_OPS:
        torch.library.register_autograd(name, backward, setup_context=setup_context)


def custom_op_definitions() -> Dict[str, object]:
    """``{qualified name: definition}`` of the ops ``torch.library.custom_op`` registered (empty before 2.4)."""
    if not CUSTOM_OPS:
        return {}
    from torch._library.custom_ops import OPDEFS
    return OPDEFS
