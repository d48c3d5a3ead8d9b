"""First-use self-checks of the window backends on GPU paths: each candidate against the dense reference.

A self-check runs once per (operation, backend, device, dtype, head dim) through the one verifier (`.verify`): a tiny
problem with key padding, a per-head bias and attention concentrated in the windows under biases of +-5 of both
signs (rows on the correction and rows in the exact-row regime; `.concentrated`), in the memory layouts modules
produce (q permuted from ``[B, Q, H, D]``, k with a strided last dim, a permuted output gradient), computed by the
candidate and by the dense reference in float64; output and every gradient (q, k, v, bias values) must agree within
the bound of `.precision` (twice the error of a dense computation in the same dtype plus the roundings only the
library's path makes). On disagreement a ``RuntimeWarning`` names the backend and `.dispatch` tries the next
candidate -- never a silent wrong result.

Which backends are checked is set by ``SPARSE_BIAS_SELF_CHECK`` (`.verify`). `self_check_results` lists what ran;
`reset_self_checks` forgets it.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

from .call import Call
from .concentrated import concentrated_qk, signed_bias
from .masks import additive_mask
from .ops import SparseBiasAttention, WindowAttention
from .precision import tolerance
from .reference import dense_attention, dense_window_attention
from .verify import needs_self_check, results, reset, verified
from ..bias import SparseBias, window_bias
from ..layout import KeyLayout
from ..windows import local_windows

__all__ = ["self_check", "self_check_results", "reset_self_checks", "passes_self_check"]


def _case(head_dim: int, op: str):
    """The tiny check problem: inputs in float64 on the CPU, the window index, key padding, the output gradient."""
    gen = torch.Generator().manual_seed(1234)
    layout = KeyLayout(bev_shape=(5, 6), cam_shape=(2, 3, 4))
    batch, heads, nq, nk = 2, 2, 6, layout.num_keys
    bev = torch.stack([torch.randint(0, 5, (batch, nq), generator=gen), torch.randint(0, 6, (batch, nq), generator=gen)], -1)
    cam = torch.stack([torch.randint(0, 2, (batch, nq), generator=gen), torch.randint(0, 3, (batch, nq), generator=gen),
                       torch.randint(0, 4, (batch, nq), generator=gen)], -1)
    bev[1, 2] = -1                                                       # a query without a BEV window
    win = local_windows(layout, bev, cam, 3, 3)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen, dtype=torch.float64) for n in (nq, nk, nk))
    wb, wc = (2 * torch.rand(batch, nq, heads, generator=gen, dtype=torch.float64) - 1 for _ in range(2))
    values = window_bias(win, wb, wc, scale=1.5).values.detach()                                # [nnz, H]
    if op == "correction":   # attention concentrated in the windows (share 0.9), biases +-5 of both signs: rows
        q, k = concentrated_qk(win, heads, head_dim, 0.9, generator=gen)     # the correction serves and exact rows
        values = signed_bias(win, 5.0, 0.5, heads=heads, generator=gen).values.detach()
    kpm = torch.zeros(batch, nk, dtype=torch.bool)
    kpm[1, -7:] = True                                                   # padded keys at the end of the range
    grad = torch.randn(batch, heads, nq, head_dim, generator=gen, dtype=torch.float64)
    return win, (q, k, v, values), kpm, grad


def _module_layouts(q, k, v, values):
    """The memory layouts real callers produce: q permuted from the projection's ``[B, Q, H, D]`` (what
    `sparse_bias.nn.SparseBiasMultiheadAttention` passes), k viewed from a ``[B, H, D, K]`` feature map (a strided
    last dim), v and the values as they are. A kernel that assumes contiguous inputs or outputs fails its check."""
    return (q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(-1, -2).contiguous().transpose(-1, -2),
            v, values)


def _evaluate(op, backend, case, device, dtype):
    """Output and gradients (float64, CPU) of one evaluation; ``backend`` None = the dense reference."""
    win, leaves, kpm, grad = case
    leaves = [t.to(device, dtype).requires_grad_() for t in leaves]
    q, k, v, values = _module_layouts(*leaves)
    win = win.to(device)
    call = Call.of(q, q.shape[-1] ** -0.5, additive_mask(q, k, kpm.to(device), None))
    if backend is None:
        out = (dense_attention(q, k, v, SparseBias(win, values).to_dense(), call) if op == "correction"
               else dense_window_attention(q, k, v, win, SparseBias(win, values), call))
    else:
        function = SparseBiasAttention if op == "correction" else WindowAttention
        out = function.apply(q, k, v, values, win.entries().as_args(), call, backend)
    g = grad.to(device, dtype).transpose(1, 2).contiguous().transpose(1, 2)        # a permuted output gradient
    res = [out] + list(torch.autograd.grad(out, leaves, g))
    return [t.detach().double().cpu() for t in res]


def _check(op, name, device, dtype, head_dim) -> Tuple[bool, str]:
    case = _case(head_dim, op)
    ref = _evaluate(op, None, case, torch.device("cpu"), torch.float64)
    same = _evaluate(op, None, case, device, dtype)                 # the dense computation in this dtype
    got = _evaluate(op, name, case, device, dtype)
    labels = ("output", "grad q", "grad k", "grad v", "grad bias")
    for label, g, s, r in zip(labels, got, same, ref):
        size = max(float(r.abs().max()), 1e-12)
        err = float((g - r).abs().max()) / size
        tol = tolerance(float((s - r).abs().max()), size, dtype) / size          # sparse_bias._core.precision
        if not err <= tol:                                                # NaN fails too
            return False, f"{label}: relative error {err:.2e} > tolerance {tol:.2e}"
    return True, "matches the dense reference"


def self_check(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
               op: str = "correction") -> Tuple[bool, str]:
    """Run (once) and return the self-check of backend ``name`` for ``op`` (``"correction"`` or ``"window"``)
    on ``device`` / ``dtype`` / ``head_dim``: ``(passed, detail)``. Warns on failure."""
    device = torch.device(device)
    key = (op, name, str(device), dtype, int(head_dim))
    return verified(key, lambda: _check(op, name, device, dtype, int(head_dim)),
                    lambda detail: f"sparse_bias: backend {name!r} disagrees with the dense reference on {device} / "
                                   f"{dtype} / head dim {head_dim} ({op}; {detail}); it is not used -- please report "
                                   "this with the output of `python -m sparse_bias.tools.selftest`")


def self_check_results() -> Dict[tuple, Tuple[bool, str]]:
    """The first-use self-checks run so far in this process: ``{key: (passed, detail)}``.

    Each backend that needs one (a GPU backend, the Triton kernels) is compared with the dense computation on a
    small case the first time it would run on a device / dtype / head dim; a failure is a warning and the backend
    is skipped (`select_backend` says so). A window backend's key is ``(op, backend, device, dtype, head dim)``
    with ``op`` ``"correction"`` (`sparse_bias_attention`) or ``"window"`` (`window_attention`); a dense kernel's
    key names the kernel. ``SPARSE_BIAS_SELF_CHECK`` (``gpu``, the default; ``always``; ``off``) sets which window
    backends are checked; the dense pass's GPU kernels always are.

    Returns:
        ``{key: (passed, detail)}``, where ``detail`` gives the measured error and its tolerance.
    """
    return results()


def reset_self_checks() -> None:
    """Forget every first-use check result (they run again on next use)."""
    reset()


def passes_self_check(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, op: str) -> bool:
    """Whether backend ``name`` may run ``op`` here: it needs no self-check (`.verify`), or it passed it."""
    return not needs_self_check(name, device) or self_check(name, device, dtype, head_dim, op)[0]
