"""The library's operations: registered forward / backward ops and one ``autograd.Function`` per op.

Structured as flash-attention's interface is. Each op -- ``sparse_attention`` (dense pass plus sparse correction,
`.correction`), ``window_attention`` (`.window`) and ``modality_attention`` (`.modality`) -- is a forward and a
backward op in the library's own ``sparse_bias`` namespace of ``torch.library`` (``torch.ops.sparse_bias.*``, as
torch-scatter's live in ``torch_scatter``; nothing else is registered). They take only tensors, floats, ints, bools
and names -- the index as `Entries.as_args`, the call as `Call.as_args` -- return contiguous tensors, and have fake
(meta) implementations giving their outputs' shapes from the inputs' (``nnz`` is the length of the index tensors, a
dynamic size under ``torch.compile``). ``torch.compile(fullgraph=True)`` therefore sees one opaque node per forward
and per backward instead of the Python around the kernels.

One ``autograd.Function`` per op (`SparseBiasAttention`, `WindowAttention`, `ModalityAttention`) calls the forward
op, saves what the backward op needs -- the dense kernel the forward ran included -- and calls the backward op; the
public functions (`sparse_bias.sparse_bias_attention`, `sparse_bias.window_attention`) validate and call
``Function.apply``. Outside a compiler trace the Functions call each op's implementation directly (`Op`): the
same code and arguments, without the dispatcher's round trip -- a registered ``custom_op`` imports
``torch._dynamo`` on its first call, 150 MB of resident memory and seconds in a process that never compiles.

Before torch 2.4 (no ``torch.library.custom_op``, probed as `sparse_bias._core.compat.CUSTOM_OPS`) nothing is
registered: the Functions call the implementations directly -- the same code -- and the dynamo of those releases
cannot trace them (torch 2.1: ``InternalTorchDynamoError: save_for_backward``): compile the model without the
attention call (``torch._dynamo.disable`` on it) there.
"""
# No `from __future__ import annotations` here: torch.library.custom_op reads these annotations as objects (torch
# 2.4 cannot resolve them from strings).
import contextlib
import functools
from typing import List, Optional

import torch
from torch import Tensor

from . import correction, modality, window
from .call import Call, compute_dtype
from .compat import custom_op, is_compiling
from ..backends import BACKENDS
from ..dense.boundary import unit_stride

__all__ = ["Op", "SparseBiasAttention", "WindowAttention", "ModalityAttention"]


class Op:
    """A registered op (``torch.ops.sparse_bias.<name>``, implementation ``impl``) and what the Functions call:
    `current`, inside ``with no_autocast(q)`` (`no_autocast`).

    The registered op returns its outputs contiguous, as its fake implementation declares them (Inductor relies on
    it); ``impl`` returns some in the dense kernels' layouts (the CPU flash kernel's key-major ``dk`` / ``dv``),
    which eager autograd takes as they are -- two passes over k / v per backward saved."""

    def __init__(self, name: str, impl):
        @functools.wraps(impl)
        def registered(*args):
            with no_autocast(args[0]):
                return [t.contiguous() for t in impl(*args)]
        self.registered = custom_op(f"sparse_bias::{name}", mutates_args=())(registered)
        self.impl = impl

    @property
    def current(self):
        """The registered op while ``torch.compile`` / ``torch.export`` trace, ``impl`` itself otherwise (returned,
        not wrapped: no Python level between a Function and the op's implementation)."""
        return self.registered if is_compiling() else self.impl

    def register_fake(self, fn):
        return self.registered.register_fake(fn)


def no_autocast(q: Tensor):
    """Autocast off around an op's implementation: the inputs are cast once, at the public entry (`.inputs`);
    inside, each op keeps its compute dtype. Under a compiler trace the registered op switches it off inside (a
    context here would put an autocast region around the op in the graph)."""
    return contextlib.nullcontext() if is_compiling() else torch.autocast(q.device.type, enabled=False)


def _like(t: Tensor, shape, dtype=None) -> Tensor:
    return t.new_empty(shape, dtype=dtype)


def _fake_grads(q, k, v, values, want_values) -> List[Tensor]:
    """The backward ops' outputs: contiguous, like the real ones -- not ``empty_like``, which would keep the inputs'
    (often permuted) strides."""
    return [_like(q, q.shape), _like(k, k.shape), _like(v, v.shape),
            _like(values, values.shape) if want_values and values is not None else _like(q, (0,))]


def _kernel_index(q: Tensor, shape) -> Tensor:
    """The fake of a CPU int64 tensor of dense-kernel indices (`sparse_bias.dense.KERNELS`)."""
    return torch.empty(shape, dtype=torch.int64, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# sparse_attention: dense pass plus sparse correction

_sparse_forward = Op("sparse_attention", correction.forward)
_sparse_backward = Op("sparse_attention_backward", correction.backward)


@_sparse_forward.register_fake
def _(q, k, v, values, index, mask, scale, dropout_p, seed, backend):
    cdt = compute_dtype(q.dtype)
    bsz, heads, nq = q.shape[:3]
    biased = values is not None
    saves_p = biased and BACKENDS[backend].saves("correction") == "p"
    return [_like(q, q.shape[:3] + v.shape[3:]), _like(q, q.shape[:3], cdt),
            _like(q, (heads, bsz * nq) if biased else (0,), cdt),
            _like(q, (heads, index[1].shape[0]) if saves_p else (0,), cdt),
            _like(q, (bsz, nq if biased else 0), torch.bool), _kernel_index(q, ())]


@_sparse_backward.register_fake
def _(grad_out, q, k, v, values, index, mask, out, lse, den, p, exact, kernel, scale, dropout_p, seed, backend,
      want_values):
    return _fake_grads(q, k, v, values, want_values)


class SparseBiasAttention(torch.autograd.Function):
    """``[B, H, Q, D]``: biased attention (``values`` None and ``index`` ``[]``: plain attention through the dense
    pass) through ``torch.ops.sparse_bias.sparse_attention`` and its backward op.

    ``apply(q, k, v, values, index, call, backend)``: q, k, v ``[B, H, Q|K, D]`` (any strides), ``values``
    ``[nnz]`` / ``[nnz, H]`` or None, ``index`` `Entries.as_args`, ``call`` a `Call`, ``backend`` a registered
    backend name (``""`` without a bias)."""

    @staticmethod
    def forward(ctx, q, k, v, values, index, call: Call, backend: str):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)       # the kernels' layout (docs/conventions.md)
        args = call.as_args()
        with no_autocast(q):
            out, lse, den, p, exact, kernel = _sparse_forward.current(q, k, v, values, index, *args, backend)
        ctx.save_for_backward(q, k, v, values, args[0], args[3], out, lse, den, p, exact, kernel, *index)
        ctx.params = (args[1], args[2], backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, values, mask, seed, out, lse, den, p, exact, kernel, *index = ctx.saved_tensors
        scale, dropout_p, backend = ctx.params
        want_values = values is not None and ctx.needs_input_grad[3]
        with no_autocast(q):
            dq, dk, dv, dvalues = _sparse_backward.current(grad_out.contiguous(), q, k, v, values, index, mask, out,
                                                           lse, den, p, exact, kernel, scale, dropout_p, seed, backend,
                                                           want_values)
        return dq, dk, dv, dvalues if want_values else None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# window_attention: softmax over each query's window entries

_window_forward = Op("window_attention", window.forward)
_window_backward = Op("window_attention_backward", window.backward)


@_window_forward.register_fake
def _(q, k, v, values, index, mask, scale, dropout_p, seed, backend):
    cols = index[1].shape[0] if BACKENDS[backend].saves("window") == "p" else q.shape[0] * q.shape[2]
    return [_like(q, q.shape[:3] + v.shape[3:]), _like(q, (q.shape[1], cols), compute_dtype(q.dtype))]


@_window_backward.register_fake
def _(grad_out, q, k, v, values, index, mask, out, state, scale, dropout_p, seed, backend, want_values):
    return _fake_grads(q, k, v, values, want_values)


class WindowAttention(torch.autograd.Function):
    """``[B, H, Q, D]``: window attention through ``torch.ops.sparse_bias.window_attention`` and its backward op;
    the arguments of `SparseBiasAttention` (``index`` never empty, ``backend`` a window backend)."""

    @staticmethod
    def forward(ctx, q, k, v, values, index, call: Call, backend: str):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        args = call.as_args()
        with no_autocast(q):
            out, state = _window_forward.current(q, k, v, values, index, *args, backend)
        ctx.save_for_backward(q, k, v, values, args[0], args[3], out, state, *index)
        ctx.params = (args[1], args[2], backend)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, values, mask, seed, out, state, *index = ctx.saved_tensors
        scale, dropout_p, backend = ctx.params
        want_values = values is not None and ctx.needs_input_grad[3]
        with no_autocast(q):
            dq, dk, dv, dvalues = _window_backward.current(grad_out.contiguous(), q, k, v, values, index, mask, out,
                                                           state, scale, dropout_p, seed, backend, want_values)
        return dq, dk, dv, dvalues if want_values else None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# modality_attention: one bias per (query, modality), combined by log-sum-exp

_modality_forward = Op("modality_attention", modality.forward)
_modality_backward = Op("modality_attention_backward", modality.backward)


@_modality_forward.register_fake
def _(q, k, v, values, bounds, mask, scale, dropout_p, seed):
    cdt, m = compute_dtype(q.dtype), len(bounds) // 2
    return [_like(q, q.shape[:3] + v.shape[3:]), _like(q, q.shape[:3] + (m,), cdt),
            _like(q, (m,) + q.shape[:3] + v.shape[3:]), _like(q, (m,) + q.shape[:3], cdt), _kernel_index(q, (m,))]


@_modality_backward.register_fake
def _(grad_out, q, k, v, out, w, outs, lses, kernels, bounds, mask, scale, dropout_p, seed, shared):
    m = len(bounds) // 2
    shape = q.shape[:1] + q.shape[2:3] + (m,) + (() if shared else q.shape[1:2])
    return [_like(q, q.shape), _like(k, k.shape), _like(v, v.shape), _like(q, shape, compute_dtype(q.dtype))]


class ModalityAttention(torch.autograd.Function):
    """``[B, H, Q, D]``: attention with a `sparse_bias.ModalityBias` through
    ``torch.ops.sparse_bias.modality_attention`` and its backward op.

    ``apply(q, k, v, values, ranges, call)``: ``values`` ``[B, Q, M]`` or ``[B, Q, M, H]``, ``ranges`` the
    modalities' ``(start, end)`` key ranges."""

    @staticmethod
    def forward(ctx, q, k, v, values, ranges, call: Call):
        q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
        args = call.as_args()
        bounds = [int(i) for r in ranges for i in r]
        with no_autocast(q):
            out, w, outs, lses, kernels = _modality_forward.current(q, k, v, values, bounds, *args)
        ctx.save_for_backward(q, k, v, args[0], args[3], out, w, outs, lses, kernels)
        ctx.params = (bounds, args[1], args[2], values.dim() == 3)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, seed, out, w, outs, lses, kernels = ctx.saved_tensors
        bounds, scale, dropout_p, shared = ctx.params
        with no_autocast(q):
            dq, dk, dv, dvalues = _modality_backward.current(grad_out.contiguous(), q, k, v, out, w, outs, lses,
                                                             kernels, bounds, mask, scale, dropout_p, seed, shared)
        return dq, dk, dv, dvalues, None, None
