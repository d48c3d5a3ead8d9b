"""The ``"triton"`` backend: fused Triton kernels for the correction's and window attention's window terms.

The block methods of `sparse_bias.backends.base.Backend` are replaced by the launchers of
`sparse_bias.backends.triton.correction` (forward: ``p``, ``S``, ``R`` and ``C`` in one pass; backward: ``<g', v_j>``,
``dq`` and the bias gradient in one pass, ``dk`` / ``dv`` by atomic adds) and `sparse_bias.backends.triton.window`
(window attention; the window log-sum-exp ``[h, B * Q]`` is the state kept for the backward). Runs on CUDA, and on
CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os

import torch

from ..base import Backend, Supports
from . import TRITON_AVAILABLE
from .correction import correction_backward, correction_forward
from .window import window_attention_backward, window_attention_forward

__all__ = ["TritonBackend"]


class TritonBackend(Backend):
    """Fused Triton kernels (CUDA, or the Triton interpreter on CPU tensors) reading window rows straight from
    ``k`` / ``v``, with float32 accumulation."""

    name = "triton"
    supports = Supports(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                        saves={"correction": "p", "window": "lse"}, auto_rank={"cuda": 0})
    description = "fused Triton kernels reading window rows straight from k / v (float32 accumulation)"
    head_block = None
    needs_contiguous = True
    #: window entries per loop step of the correction kernels
    block = 32

    def available(self):
        if not TRITON_AVAILABLE:
            return False, "triton is not installed (`pip install triton`: the triton extra)"
        return True, self.description

    def can_run(self, device, dtype, head_dim=None, op=None):
        if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Triton runs on CUDA (or on CPU tensors under TRITON_INTERPRET=1)"
        return super().can_run(device, dtype, head_dim, op)

    def forward_block(self, blk, qkv, lse, state, totals):
        correction_forward(blk, qkv, lse, state, totals, self.block)

    def backward_block(self, blk, qkv, upstream, state, grads):
        return correction_backward(blk, qkv, upstream, state, grads, self.block)

    # window attention: the state kept for the backward is the window log-sum-exp [h, B * Q]

    def window_forward_block(self, blk, qkv, state, out):
        q, k, v = (t.contiguous() for t in qkv)
        window_attention_forward(q, k, v, blk.ent.indptr, blk.ent.key, blk.bvals, blk.emask, blk.keep,
                                 blk.call.scale, blk.hs.start, out, state)

    def window_backward_block(self, blk, qkv, upstream, state, grads):
        (g, go), (dq, dk, dv) = upstream, grads
        q, k, v = (t.contiguous() for t in qkv)
        db = torch.zeros(blk.heads, blk.ent.nnz, dtype=torch.float32, device=q.device)
        window_attention_backward(q, k, v, blk.ent.indptr, blk.ent.key, blk.bvals, blk.emask, blk.keep,
                                  blk.call.scale, blk.hs.start, g.contiguous(), go, state, dq, dk, dv, db)
        return db
