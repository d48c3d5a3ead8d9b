"""Build of the optional fused CPU kernels (``sparse_bias._C``), compiled against the installed torch.

Install with ``pip install --no-build-isolation -e .`` in a checkout (the Makefile does; docs/install.md) so that
torch is importable here, as torch-scatter is built. The extension is optional:

- a plain ``pip install`` (build isolation: torch is not importable here) builds a wheel without it; the package
  then compiles the same sources with the same flags on first use, against the torch it runs with, and caches
  the build (``sparse_bias/_core/extension.py``; ``SPARSE_BIAS_JIT=0`` turns that off). This script says so on stderr
  (pip shows a build's output with ``-v``);
- with ``SPARSE_BIAS_NO_EXT=1``, or when the compiler fails, the package installs without it and the pure-PyTorch
  backends are used (a warning says why).

The kernel sources (``sparse_bias/csrc/*.cpp``, ``*.h``) ship in the wheel either way, for the first-use compile.
"""
import importlib.util
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _kernel_spec():
    """Sources and flags from ``sparse_bias/_core/extension.py`` (one definition for the build here and the first-use
    compile), loaded as a file: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location("_sparse_bias_extension_spec",
                                                  os.path.join(HERE, "sparse_bias", "_core", "extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notice(text):
    """A notice that shows in the build log (pip prints it with ``-v``; ``python -m build`` always)."""
    print(f"\n*** sparse_bias: {text}\n", file=sys.stderr, flush=True)


spec = _kernel_spec()
ext_modules, cmdclass = [], {}
if os.environ.get("SPARSE_BIAS_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        _notice("torch is not importable at build time (pip's build isolation hides it), so the fused CPU kernels "
                "(sparse_bias._C) are not built now: they are compiled on first use against the torch the package "
                "runs with, once (about 40 s on 2 cores; needs a C++ compiler and ninja; SPARSE_BIAS_JIT=0 turns "
                "that off). To build them now instead: `pip install --no-build-isolation -e .` in the "
                "checkout, with torch installed first.")
    else:
        class OptionalBuildExt(BuildExtension):
            """Build the extension, but install without it when the compiler fails."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # pragma: no cover - depends on the machine's compiler
                    _notice(f"sparse_bias._C (fused CPU kernels) was not built: {exc}; the package tries to compile "
                            "them on first use, else runs on the pure-PyTorch backends")

        ext_modules = [CppExtension(
            "sparse_bias._C", [f"sparse_bias/{rel}" for rel in spec.SOURCES],
            extra_compile_args=list(spec.EXTRA_COMPILE_ARGS), extra_link_args=list(spec.EXTRA_LINK_ARGS))]
        # ninja (when on PATH) compiles the kernel files side by side; without it torch falls back to one at a time
        cmdclass = {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass,
      # the kernel sources travel with the package: the first-use compile (sparse_bias/_core/extension.py) needs them
      package_data={"sparse_bias": ["py.typed", "csrc/*.cpp", "csrc/*.h"]})
