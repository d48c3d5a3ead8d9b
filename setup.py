"""Build of the optional fused CPU kernels (``sparse_bias._C``), compiled against the installed torch.

Install with ``pip install --no-build-isolation -e .`` (the Makefile does) so that torch is importable here,
as torch-scatter is built. The extension is optional: without torch at build time, with
``SPARSE_BIAS_NO_EXT=1``, or when the compiler fails, the package installs without it and the pure-PyTorch
backends are used (a warning says why).
"""
import os
import warnings

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("SPARSE_BIAS_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # pragma: no cover - torch is installed first by the Makefile
        warnings.warn("torch is not importable at build time: sparse_bias._C (fused CPU kernels) is not built")
    else:
        class OptionalBuildExt(BuildExtension):
            """Build the extension, but install without it when the compiler fails."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # pragma: no cover - depends on the machine's compiler
                    warnings.warn(f"sparse_bias._C (fused CPU kernels) was not built: {exc}; the pure-PyTorch "
                                  "backends are used instead")

        ext_modules = [CppExtension(
            "sparse_bias._C", ["sparse_bias/csrc/window_terms.cpp", "sparse_bias/csrc/dense_dropout.cpp"],
            # fast-math for vectorised loops, but IEEE infinities kept (masked scores are -inf; csrc/vec_math.h)
            extra_compile_args=["-O3", "-march=native", "-fopenmp", "-ffast-math", "-fno-finite-math-only"],
            extra_link_args=["-fopenmp"])]
        # ninja (when on PATH) compiles the kernel files side by side; without it torch falls back to one at a time
        cmdclass = {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
