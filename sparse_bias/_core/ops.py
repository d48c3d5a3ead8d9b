"""The library's operations registered with ``torch.library``: raw op, then autograd, then the Python entry.

Layered as flash-attention's interface is: ``torch.ops.sparse_bias.sparse_attention`` /
``torch.ops.sparse_bias.window_attention`` (and their ``*_backward`` ops) take only tensors, floats and a backend
name; each has a fake (meta) implementation giving its output shapes from the input shapes -- ``nnz`` is the length
of the index tensors, a dynamic size under ``torch.compile`` -- and its autograd formula registered with
`torch.library.register_autograd`. `sparse_op` / `window_op` unpack a `sparse_bias.WindowIndex` and a
`sparse_bias._core.call.Call` into those arguments; the public functions (`sparse_bias.sparse_bias_attention`,
`sparse_bias.window_attention`) validate and call them. ``torch.compile(fullgraph=True)`` therefore sees one opaque
node per attention (forward and backward) instead of the Python around the kernels.

Eager calls of `sparse_op` take `_EagerSparse`, an ``autograd.Function`` over the same implementation and backward:
the registered op must return contiguous gradients (Inductor relies on it), and the CPU flash kernel's come
key-major, so the op copies them -- a cost the eager path does not pay.

Before torch 2.4 (no ``torch.library.custom_op``, probed as `sparse_bias._core.compat.CUSTOM_OPS`) nothing is
registered: both public ops run through their eager ``autograd.Function`` (`_EagerSparse`, `_EagerWindow`), which
the dynamo of those releases cannot trace (torch 2.1: ``InternalTorchDynamoError: save_for_backward``): compile the
model without the attention call (``torch._dynamo.disable`` on it) there.

The ops live in the library's own ``sparse_bias`` namespace of ``torch.library`` (as torch-scatter's live in
``torch_scatter``); nothing else is registered.
"""
# No `from __future__ import annotations` here: torch.library.custom_op reads these annotations as objects (torch
# 2.4 cannot resolve them from strings).
from functools import partial
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .call import Call, compute_dtype
from .compat import CUSTOM_OPS, custom_op, is_compiling, register_autograd
from .entries import Entries
from .correction import sparse_backward, sparse_forward
from .window import window_backward, window_forward
from .threads import calling_thread_if_small
from ..backends import BACKENDS
from ..dense.boundary import unit_stride
from ..dense.dropout import seed64

__all__ = ["sparse_op", "window_op", "seed_tensor"]

_INDEX = ("indptr", "key", "row", "tcrow", "trow", "perm", "order")


def seed_tensor(seed) -> Tensor:
    """The dropout seed as the ops take it: a CPU int64 scalar (an int is mapped to the int64 with the same low 64
    bits; a tensor -- drawn inside a compiled graph -- passes as is)."""
    if isinstance(seed, Tensor):
        return seed
    return torch.tensor(seed64(seed), dtype=torch.int64)


def _call(q: Tensor, mask: Optional[Tensor], scale: float, dropout_p: float, seed: Tensor) -> Call:
    """The call record inside an op (the seed read on the host: a CPU tensor, never a device synchronisation)."""
    return Call(scale, mask, dropout_p, int(seed.tolist()) if dropout_p > 0 else 0, compute_dtype(q.dtype))


def _dense(tensors) -> List[Tensor]:
    """The op's outputs, contiguous (as its fake implementation declares them; the dense kernels return some in
    other layouts, e.g. the CPU flash op's ``[B, K, H, D]``-ordered gradients)."""
    return [t.contiguous() for t in tensors]


def _fake_grads(q, k, v, values, want_values):
    """The backward ops' outputs: contiguous, like the real ones (`_dense`) -- not ``empty_like``, which would keep
    the inputs' (often permuted) strides."""
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            values.new_empty(values.shape) if want_values and values is not None else q.new_empty(0)]


def _entries(q: Tensor, k: Tensor, index: Sequence[Optional[Tensor]]) -> Optional[Entries]:
    if index[0] is None:
        return None
    return Entries(*index, q.shape[0], q.shape[2], k.shape[2])


def _index(win) -> List[Optional[Tensor]]:
    if win is None:
        return [None] * len(_INDEX)
    ent = win.entries()
    return [getattr(ent, name) for name in _INDEX]


# ---------------------------------------------------------------------------------------------------------------
# sparse_bias_attention: dense pass plus sparse correction


def _sparse_impl(q, k, v, values, indptr, key, row, tcrow, trow, perm, order, mask, scale, dropout_p, seed, backend):
    ent = _entries(q, k, (indptr, key, row, tcrow, trow, perm, order))
    with calling_thread_if_small(q, k, key):
        return list(sparse_forward(q, k, v, values, ent, _call(q, mask, scale, dropout_p, seed),
                                   BACKENDS[backend] if backend else None))


def _sparse_backward_impl(grad_out, q, k, v, values, indptr, key, row, tcrow, trow, perm, order, mask, out, lse, den,
                          p, exact, scale, dropout_p, seed, backend, want_values):
    ent = _entries(q, k, (indptr, key, row, tcrow, trow, perm, order))
    call = _call(q, mask, scale, dropout_p, seed)
    with calling_thread_if_small(q, k, key):
        dq, dk, dv, dvalues = sparse_backward(grad_out, (q, k, v, values, out, lse, den, p, exact), ent, call,
                                              BACKENDS[backend] if backend else None, want_values)
    return [dq, dk, dv, q.new_empty(0) if dvalues is None else dvalues]


@custom_op("sparse_bias::sparse_attention", mutates_args=())
def _sparse_attention(q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor], indptr: Optional[Tensor],
                      key: Optional[Tensor], row: Optional[Tensor], tcrow: Optional[Tensor], trow: Optional[Tensor],
                      perm: Optional[Tensor], order: Optional[Tensor], mask: Optional[Tensor], scale: float,
                      dropout_p: float, seed: Tensor, backend: str) -> List[Tensor]:
    """``[out, lse, den, p, exact]`` of `sparse_bias._core.correction.sparse_forward`."""
    return _dense(_sparse_impl(q, k, v, values, indptr, key, row, tcrow, trow, perm, order, mask, scale, dropout_p,
                               seed, backend))


@_sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, values, indptr, key, row, tcrow, trow, perm, order, mask, scale, dropout_p, seed,
                           backend):
    cdt = compute_dtype(q.dtype)
    bsz, heads, nq = q.shape[:3]
    biased = values is not None
    saves_p = biased and BACKENDS[backend].saves("correction") == "p"
    return [q.new_empty(q.shape[:3] + v.shape[3:]), q.new_empty(q.shape[:3], dtype=cdt),
            q.new_empty((heads, bsz * nq) if biased else (0,), dtype=cdt),
            q.new_empty((heads, key.shape[0]) if saves_p else (0,), dtype=cdt),
            q.new_empty((bsz, nq if biased else 0), dtype=torch.bool)]


@custom_op("sparse_bias::sparse_attention_backward", mutates_args=())
def _sparse_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor],
                               indptr: Optional[Tensor], key: Optional[Tensor], row: Optional[Tensor],
                               tcrow: Optional[Tensor], trow: Optional[Tensor], perm: Optional[Tensor],
                               order: Optional[Tensor], mask: Optional[Tensor], out: Tensor, lse: Tensor, den: Tensor,
                               p: Tensor, exact: Tensor, scale: float, dropout_p: float, seed: Tensor,
                               backend: str, want_values: bool) -> List[Tensor]:
    """``[dq, dk, dv, dvalues]`` (``dvalues`` empty when not wanted)."""
    return _dense(_sparse_backward_impl(grad_out, q, k, v, values, indptr, key, row, tcrow, trow, perm, order, mask,
                                        out, lse, den, p, exact, scale, dropout_p, seed, backend, want_values))


@_sparse_attention_backward.register_fake
def _sparse_attention_backward_fake(grad_out, q, k, v, values, *rest):
    want_values = rest[-1]
    return _fake_grads(q, k, v, values, want_values)


def _setup(ctx, inputs, output):
    """Both ops' autograd context: the tensors (inputs, index, mask, every output, seed) and the scalars."""
    q, k, v, values, *index_mask_scale = inputs
    *index, mask, scale, dropout_p, seed, backend = index_mask_scale
    ctx.save_for_backward(q, k, v, values, *index, mask, *output, seed)
    ctx.params = (scale, dropout_p, backend)


def _backward(backward_fn, ctx, grads, want_values=None):
    """Both ops' autograd formula: ``backward_fn`` (a backward op, or its implementation) takes the output gradient,
    the saved tensors in their order and the scalars (the backward ops' common signature)."""
    q, k, v, values, *rest = ctx.saved_tensors
    index, mask, outputs, seed = rest[:len(_INDEX)], rest[len(_INDEX)], rest[len(_INDEX) + 1:-1], rest[-1]
    scale, dropout_p, backend = ctx.params
    want_values = values is not None and (ctx.needs_input_grad[3] if want_values is None else want_values)
    dq, dk, dv, dvalues = backward_fn(grads[0].contiguous(), q, k, v, values, *index, mask, *outputs, scale,
                                      dropout_p, seed, backend, want_values)
    return (dq, dk, dv, dvalues if want_values else None) + (None,) * (len(_INDEX) + 5)


register_autograd("sparse_bias::sparse_attention", partial(_backward, _sparse_attention_backward),
                  setup_context=_setup)


def _eager_function(name: str, doc: str, forward_impl, backward_impl) -> type:
    """An ``autograd.Function`` running an op's implementation and autograd formula eagerly (output 0
    differentiable, the rest saved state)."""

    def forward(ctx, *inputs):
        output = forward_impl(*inputs)
        _setup(ctx, inputs, output)
        ctx.mark_non_differentiable(*output[1:])
        return tuple(output)

    def backward(ctx, *grads):
        return _backward(backward_impl, ctx, grads, want_values=ctx.needs_input_grad[3])

    return type(name, (torch.autograd.Function,), {"__doc__": doc, "forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


_EagerSparse = _eager_function(
    "_EagerSparse", """The eager path of the sparse op: the same implementation and autograd formula, without the
    contiguous-output contract the compiled path needs (the CPU flash kernel's gradients come key-major; copying them
    would cost two passes over k / v per backward).""", _sparse_impl, _sparse_backward_impl)


def sparse_op(q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor], win, call: Call,
              backend: Optional[str]) -> Tensor:
    """``[B, H, Q, D]``: biased attention through ``torch.ops.sparse_bias.sparse_attention`` (``values`` and
    ``win`` None: plain attention through the dense pass); eagerly through `_EagerSparse`, the same implementation."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)       # the kernels' layout (docs/conventions.md)
    args = (q, k, v, values, *_index(win), call.mask, call.scale, call.dropout_p, seed_tensor(call.seed),
            backend or "")
    if CUSTOM_OPS and is_compiling():
        return _sparse_attention(*args)[0]
    return _EagerSparse.apply(*args)[0]


# ---------------------------------------------------------------------------------------------------------------
# window_attention: softmax over each query's window entries


@custom_op("sparse_bias::window_attention", mutates_args=())
def _window_attention(q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor], indptr: Tensor, key: Tensor,
                      row: Tensor, tcrow: Tensor, trow: Tensor, perm: Tensor, order: Tensor, mask: Optional[Tensor],
                      scale: float, dropout_p: float, seed: Tensor, backend: str) -> List[Tensor]:
    """``[out, state]`` of `sparse_bias._core.window.window_forward`."""
    ent = _entries(q, k, (indptr, key, row, tcrow, trow, perm, order))
    with calling_thread_if_small(q, k, key, dense=False):
        return _dense(window_forward(q, k, v, values, ent, _call(q, mask, scale, dropout_p, seed),
                                     BACKENDS[backend]))


@_window_attention.register_fake
def _window_attention_fake(q, k, v, values, indptr, key, row, tcrow, trow, perm, order, mask, scale, dropout_p, seed,
                           backend):
    saves_p = BACKENDS[backend].saves("window") == "p"
    cols = key.shape[0] if saves_p else q.shape[0] * q.shape[2]
    return [q.new_empty(q.shape[:3] + v.shape[3:]), q.new_empty((q.shape[1], cols), dtype=compute_dtype(q.dtype))]


@custom_op("sparse_bias::window_attention_backward", mutates_args=())
def _window_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor],
                               indptr: Tensor, key: Tensor, row: Tensor, tcrow: Tensor, trow: Tensor, perm: Tensor,
                               order: Tensor, mask: Optional[Tensor], out: Tensor, state: Tensor, scale: float,
                               dropout_p: float, seed: Tensor, backend: str, want_values: bool) -> List[Tensor]:
    """``[dq, dk, dv, dvalues]`` (``dvalues`` empty when not wanted)."""
    ent = _entries(q, k, (indptr, key, row, tcrow, trow, perm, order))
    with calling_thread_if_small(q, k, key, dense=False):
        dq, dk, dv, dvalues = window_backward(grad_out, (q, k, v, values, out, state), ent,
                                              _call(q, mask, scale, dropout_p, seed), BACKENDS[backend], want_values)
    return _dense((dq, dk, dv, q.new_empty(0) if dvalues is None else dvalues))


@_window_attention_backward.register_fake
def _window_attention_backward_fake(grad_out, q, k, v, values, *rest):
    want_values = rest[-1]
    return _fake_grads(q, k, v, values, want_values)


register_autograd("sparse_bias::window_attention", partial(_backward, _window_attention_backward),
                  setup_context=_setup)


_EagerWindow = _eager_function(
    "_EagerWindow", """Window attention on a torch without ``torch.library.custom_op``: the op's implementation and
    autograd formula as an ``autograd.Function``.""", _window_attention, _window_attention_backward)


def window_op(q: Tensor, k: Tensor, v: Tensor, values: Optional[Tensor], win, call: Call, backend: str) -> Tensor:
    """``[B, H, Q, D]``: window attention through ``torch.ops.sparse_bias.window_attention`` (`_EagerWindow`
    without custom ops)."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    args = (q, k, v, values, *_index(win), call.mask, call.scale, call.dropout_p, seed_tensor(call.seed), backend)
    if CUSTOM_OPS:
        return _window_attention(*args)[0]
    return _EagerWindow.apply(*args)[0]
