"""``python -m sparse_bias.selftest``: the self-test on your device (see ``sparse_bias.selftest()``).

The implementation lives in ``sparse_bias.tools.selftest``. Importing this module replaces the package attribute
``sparse_bias.selftest`` (the function) with the module, as Python does for every submodule, so the module is
made callable: ``sb.selftest(...)`` runs the self-test either way.
"""
import sys
import types

from .tools.selftest import cli, main, selftest

__all__ = ["selftest", "main", "cli"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return selftest(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(cli())
