"""Backend choice for the window terms (above the ops), with a first-use self-check of every GPU path.

`choose_backend` walks `sparse_bias.backends.AUTO_ORDER` for the input's device and takes the first backend that can
run the operation there (its declared `sparse_bias.backends.Supports`) *and* passes its self-check. A self-check runs
once per (operation, backend, device, dtype, head dim) through the one verifier (`sparse_bias._core.verify`): a tiny
problem with key padding, a per-head bias and attention concentrated in the windows under biases of +-5 of both
signs (rows on the correction and rows in the exact-row regime; `sparse_bias._core.concentrated`), in the memory
layouts modules produce (q permuted from ``[B, Q, H, D]``, k with a strided last dim, a permuted output gradient),
computed by the candidate and by the dense reference in float64; output and every gradient (q, k, v, bias values)
must agree within the bound of `sparse_bias._core.precision` (twice the error of a dense computation in the same dtype
plus the roundings only the library's path makes). On disagreement a ``RuntimeWarning`` names the backend and the
next candidate is tried -- never a silent wrong result. An explicitly requested backend that fails its check falls
back the same way.

Which backends are checked is set by ``SPARSE_BIAS_SELF_CHECK`` (`sparse_bias._core.verify`). `self_check_results` lists
what ran; `reset_self_checks` forgets it.
"""
from __future__ import annotations

import logging
from typing import Dict, Tuple

import torch

from .compat import CUSTOM_OPS
from .call import Call
from .concentrated import concentrated_qk, signed_bias
from .precision import tolerance
from .reference import dense_attention, dense_window_attention
from .ops import sparse_op, window_op
from .inputs import additive_mask
from .verify import SELF_CHECK_ENV, needs_self_check, results, reset, verified
from ..backends import AUTO_ORDER, BACKENDS, OPS
from ..bias import SparseBias, window_bias
from ..layout import KeyLayout
from ..windows import local_windows

logger = logging.getLogger("sparse_bias")

__all__ = ["choose_backend", "self_check", "self_check_results", "reset_self_checks", "needs_self_check",
           "SELF_CHECK_ENV"]


def _case(head_dim: int, kind: str):
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
    if kind == "correction":   # attention concentrated in the windows (share 0.9), biases +-5 of both signs: rows
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


def _evaluate(kind, backend, case, device, dtype):
    """Output and gradients (float64, CPU) of one evaluation; ``backend`` None = the dense reference."""
    win, leaves, kpm, grad = case
    leaves = [t.to(device, dtype).requires_grad_() for t in leaves]
    q, k, v, values = _module_layouts(*leaves)
    win = win.to(device)
    call = Call.of(q, q.shape[-1] ** -0.5, additive_mask(q, k, kpm.to(device), None))
    if backend is None:
        out = (dense_attention(q, k, v, SparseBias(win, values).to_dense(), call) if kind == "correction"
               else dense_window_attention(q, k, v, win, SparseBias(win, values), call))
    else:
        out = (sparse_op if kind == "correction" else window_op)(q, k, v, values, win, call, backend)
    g = grad.to(device, dtype).transpose(1, 2).contiguous().transpose(1, 2)        # a permuted output gradient
    res = [out] + list(torch.autograd.grad(out, leaves, g))
    return [t.detach().double().cpu() for t in res]


def _check(kind, name, device, dtype, head_dim) -> Tuple[bool, str]:
    case = _case(head_dim, kind)
    ref = _evaluate(kind, None, case, torch.device("cpu"), torch.float64)
    same = _evaluate(kind, None, case, device, dtype)                 # the dense computation in this dtype
    got = _evaluate(kind, name, case, device, dtype)
    labels = ("output", "grad q", "grad k", "grad v", "grad bias")
    for label, g, s, r in zip(labels, got, same, ref):
        size = max(float(r.abs().max()), 1e-12)
        err = float((g - r).abs().max()) / size
        tol = tolerance(float((s - r).abs().max()), size, dtype) / size          # sparse_bias._core.precision
        if not err <= tol:                                                # NaN fails too
            return False, f"{label}: relative error {err:.2e} > tolerance {tol:.2e}"
    return True, "matches the dense reference"


def self_check(name: str, device: torch.device, dtype: torch.dtype, head_dim: int,
               kind: str = "correction") -> Tuple[bool, str]:
    """Run (once) and return the self-check of backend ``name`` for ``kind`` (``"correction"`` or ``"window"``)
    on ``device`` / ``dtype`` / ``head_dim``: ``(passed, detail)``. Warns on failure."""
    device = torch.device(device)
    key = (kind, name, str(device), dtype, int(head_dim))
    return verified(key, lambda: _check(kind, name, device, dtype, int(head_dim)),
                    lambda detail: f"sparse_bias: backend {name!r} disagrees with the dense reference on {device} / "
                                   f"{dtype} / head dim {head_dim} ({kind}; {detail}); it is not used -- please report "
                                   "this with the output of `python -m sparse_bias.tools.selftest`")


def self_check_results() -> Dict[tuple, Tuple[bool, str]]:
    """The first-use checks run so far (window backends and dense kernels): ``{key: (passed, detail)}``; a window
    backend's key is ``(kind, backend, device, dtype, head dim)``."""
    return results()


def reset_self_checks() -> None:
    """Forget every first-use check result (they run again on next use)."""
    reset()


def _passes(name, device, dtype, head_dim, kind) -> bool:
    return not needs_self_check(name, device) or self_check(name, device, dtype, head_dim, kind)[0]


def choose_backend(device: torch.device, dtype: torch.dtype, head_dim: int, requested: str = "auto",
                   kind: str = "correction") -> Tuple[str, str]:
    """The backend for the window terms and why: ``(name, reason)``.

    Args:
        device: q's device.
        dtype: q's dtype.
        head_dim: ``D`` of ``q [B, H, Q, D]``.
        requested: a backend name or ``"auto"`` (``"dense"`` is handled by the callers).
        kind: ``"correction"`` (`sparse_bias.sparse_bias_attention`) or ``"window"``
            (`sparse_bias.window_attention`).

    Raises:
        RuntimeError: a requested backend that cannot run here, or no backend that can.

    The choice is logged (logger ``"sparse_bias"``, level DEBUG). Under ``torch.compile`` it is made once, at trace
    time (`torch.compiler.assume_constant_result`): the graph holds the backend chosen and checked then.
    """
    name, why = _choose_backend(device, dtype, head_dim, requested, kind)
    if not CUSTOM_OPS:
        why += ("; this torch has no torch.library.custom_op (2.4+): the op runs as an eager autograd.Function, "
                "which torch.compile cannot trace on this torch (exclude the call: torch._dynamo.disable)")
    logger.debug("%s: backend %s on %s / %s / head dim %d (%s)", kind, name, device, dtype, head_dim, why)
    return name, why


# A compiled graph takes the choice made (and self-checked) at trace time: what torch.compiler.assume_constant_result
# marks, set directly so that importing the library does not import torch._dynamo (tests/test_compile.py).
choose_backend._dynamo_marked_constant = True


def _choose_backend(device, dtype, head_dim, requested, kind):
    if kind not in OPS:
        raise ValueError(f"kind must be one of {OPS}, got {kind!r}")
    order = AUTO_ORDER.get(device.type, AUTO_ORDER["other"])
    candidates = [(n,) + BACKENDS[n].can_run(device, dtype, head_dim, kind) for n in order
                  if kind in BACKENDS[n].supports.ops]
    note = ""
    if requested != "auto":
        ok, why = BACKENDS[requested].can_run(device, dtype, head_dim, kind)
        if not ok:
            raise RuntimeError(f"backend {requested!r} cannot run here: {why}")
        if _passes(requested, device, dtype, head_dim, kind):
            return requested, f"requested: {why}"
        note = f" (requested {requested!r} failed its self-check)"
    for name, ok, why in candidates:
        if ok and name != requested and _passes(name, device, dtype, head_dim, kind):
            skipped = "; ".join(f"{n}: {w}" for n, o, w in candidates if not o)
            return name, f"auto on {device.type}/{dtype}: {why}" + (f" (skipped {skipped})" if skipped else "") + note
    raise RuntimeError(f"no {kind} backend can run on {device} / {dtype}: "
                       + "; ".join(f"{n}: {w}" for n, _, w in candidates) + note)
