"""How far a correct result in a low-precision dtype may be from the float64 reference.

One rule for the first-use self-checks (`sparse_bias._core.dispatch`) and the self-test (`sparse_bias.tools.selftest`),
from a precision analysis rather than from one run:

* the inputs are rounded to the dtype once, for the naive dense computation and for the library alike; the naive
  computation in the same dtype (`sparse_bias.dense_bias_attention`) shows what that rounding costs on this
  problem (``naive_err``, measured against float64). A second, equally correct summation order can be off by as
  much again in the other direction: ``2 * naive_err``;
* on top of that, the library's path rounds to the input dtype where the naive one does not: the output before
  the dense kernel's backward, the probabilities and ``dS`` inside that kernel, the kernel's ``dq`` / ``dk`` /
  ``dv`` before the window terms are added, and the final cast -- at most `EXTRA_ROUNDINGS` roundings of half an
  ``eps`` each, of terms no larger than the result's magnitude (rows where the correction would cancel are
  evaluated densely instead, `sparse_bias._core.exact_rows`, so no term is larger than that);
* a floor for sums over thousands of keys, where rounding errors of float32 accumulators add up
  (``1e-5`` relative; ``1e-9`` for float64).

A kernel outside this bound has a bug, not a rounding difference (e.g. bfloat16 ``dq``: 1.6e-2 of its largest
value measured, bound 2.3e-2 plus twice the naive error).
"""
from __future__ import annotations

import torch

__all__ = ["tolerance", "EXTRA_ROUNDINGS"]

#: roundings to the input dtype on the library's path that the naive dense computation does not make
EXTRA_ROUNDINGS = 6

_FLOOR = {torch.float64: 1e-9}


def tolerance(naive_err: float, size: float, dtype: torch.dtype) -> float:
    """The largest absolute error a correct result may have: ``naive_err`` is the naive dense computation's
    largest absolute error in ``dtype`` (against float64), ``size`` the reference's largest magnitude."""
    eps = torch.finfo(dtype).eps
    return 2 * naive_err + (EXTRA_ROUNDINGS * eps / 2 + _FLOOR.get(dtype, 1e-5)) * size
