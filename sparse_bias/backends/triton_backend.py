"""Fused Triton kernels for the window correction (the ``"triton"`` backend).

One program per (query, head) walks the query's window entries in blocks, reading each window key's
``k`` / ``v`` row straight from the ``[B, H, K, D]`` tensors through the CSR key indices -- no gathered
copies. Forward: ``p_j``, ``S`` and ``C`` in one pass. Backward: ``<g', v_j>``, the ``dq`` correction and
the bias gradient in one pass, with the ``dk`` / ``dv`` corrections as atomic adds into the key rows.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``), which is
how the test suite checks it without a GPU. Inputs in float32, float16 or bfloat16: every load is converted
to float32 and all arithmetic (scores, ``p``, ``S``, ``C`` and every gradient term) runs in float32
registers; the ``dk`` / ``dv`` corrections of half-precision inputs are added atomically into a float32
scratch buffer of the block's heads and cast once (float32 inputs add into the gradients directly).
Offsets into ``[B, H, Q|K, D]`` tensors and ``[h, nnz]`` entry arrays are computed in int64, so shapes
with ``B*H*K*D`` or ``nnz*H`` beyond 2^31 address correctly.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from . import triton_window
from .base import Backend, Supports

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

_KERNELS = {}


def _kernels():
    """Compile-on-first-use: Triton is imported only when the triton backend runs (it is a heavy import)."""
    global triton, tl, _entries  # module globals: jitted functions resolve names through their globals
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _entries(KEY, e0, end, kv_base, d, dm, D: tl.constexpr, BLOCK: tl.constexpr):
        """A block of window entries: validity, entry index (int64), the key of each entry (int64), the offsets of
        their k/v rows and the 2-D load mask."""
        e = e0 + tl.arange(0, BLOCK)
        m = e < end
        key = tl.load(KEY + e, mask=m, other=0).to(tl.int64)
        return m, e.to(tl.int64), key, (kv_base + key)[:, None] * D + d[None, :], m[:, None] & dm[None, :]

    @triton.jit
    def _fwd_kernel(Q, K, V, LSE, INDPTR, KEY, BV, EM, KP, P, DEN, REM, OUT,
                    nq, nk, h0, heads, scale,
                    lse_s, bv_s, em_s, kp_s, p_s, den_s, out_s, out_r,
                    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, HAS_EM: tl.constexpr,
                    HAS_KP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)          # global row b * Q + q
        i = tl.program_id(1).to(tl.int64)          # head within the block
        b = r // nq
        bh = b * heads + h0 + i                    # int64 (i is): offsets below cannot overflow
        kv_base = bh * nk
        start = tl.load(INDPTR + r)
        end = tl.load(INDPTR + r + 1)
        d = tl.arange(0, DP)
        dm = d < D
        qrow = tl.load(Q + (bh * nq + r - b * nq) * D + d, mask=dm, other=0.0).to(tl.float32)
        lse = tl.load(LSE + i * lse_s + r)
        s_tot = tl.zeros([BLOCK], dtype=tl.float32)
        r_tot = tl.zeros([BLOCK], dtype=tl.float32)
        c_acc = tl.zeros([DP], dtype=tl.float32)
        for e0 in range(start, end, BLOCK):
            m, local, key, rows, mm = _entries(KEY, e0, end, kv_base, d, dm, D, BLOCK)
            krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
            s = tl.sum(krows * qrow[None, :], axis=1) * scale
            if HAS_EM:
                s += tl.load(EM + i * em_s + local, mask=m, other=0.0)
            p = tl.where(m, tl.exp(s - lse), 0.0)
            tl.store(P + i * p_s + local, p, mask=m)
            a = p * (tl.exp(tl.load(BV + i * bv_s + local, mask=m, other=0.0)) - 1.0)
            s_tot += a
            r_tot += tl.maximum(-a, 0.0)                  # the removed mass R (sparse_bias._core.exact_rows)
            if HAS_KP:
                a = a * tl.load(KP + i * kp_s + local, mask=m, other=0.0)
            c_acc += tl.sum(a[:, None] * tl.load(V + rows, mask=mm, other=0.0).to(tl.float32), axis=0)
        tl.store(DEN + i * den_s + r, tl.load(DEN + i * den_s + r) + tl.sum(s_tot, axis=0))
        tl.store(REM + i * den_s + r, tl.load(REM + i * den_s + r) + tl.sum(r_tot, axis=0))
        optr = OUT + i * out_s + r * out_r + d      # the output's own strides (a view of the dense pass's)
        tl.store(optr, tl.load(optr, mask=dm, other=0.0) + c_acc, mask=dm)

    @triton.jit
    def _bwd_kernel(Q, K, V, GP, GO, INDPTR, KEY, P, BV, KP, DQ, DK, DV, DB,
                    nq, nk, h0, heads, dkv_heads, dkv_h0, scale,
                    go_s, p_s, bv_s, kp_s, dq_s, dq_r, db_s,
                    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, HAS_KP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)          # global row b * Q + q
        i = tl.program_id(1).to(tl.int64)
        b = r // nq
        bh = b * heads + h0 + i
        qk = bh * nq + r - b * nq
        kv_base = bh * nk
        dkv_base = (b * dkv_heads + dkv_h0 + i) * nk      # the gradients' (or the float32 scratch's) rows
        start = tl.load(INDPTR + r)
        end = tl.load(INDPTR + r + 1)
        d = tl.arange(0, DP)
        dm = d < D
        qrow = tl.load(Q + qk * D + d, mask=dm, other=0.0).to(tl.float32)
        grow = tl.load(GP + qk * D + d, mask=dm, other=0.0)
        go = tl.load(GO + i * go_s + r)
        dq_acc = tl.zeros([DP], dtype=tl.float32)
        for e0 in range(start, end, BLOCK):
            m, local, key, rows, mm = _entries(KEY, e0, end, kv_base, d, dm, D, BLOCK)
            grows = (dkv_base + key)[:, None] * D + d[None, :]
            p = tl.load(P + i * p_s + local, mask=m, other=0.0)
            eb = tl.exp(tl.load(BV + i * bv_s + local, mask=m, other=0.0))
            a = p * (eb - 1.0)
            gv = tl.sum(tl.load(V + rows, mask=mm, other=0.0).to(tl.float32) * grow[None, :], axis=1)  # <g', v_j>
            ak = a
            if HAS_KP:
                keep = tl.load(KP + i * kp_s + local, mask=m, other=0.0)
                gv = gv * keep
                ak = a * keep
            diff = gv - go
            dd = a * diff
            krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
            dq_acc += tl.sum(dd[:, None] * krows, axis=0) * scale
            tl.atomic_add(DK + grows, (dd * scale)[:, None] * qrow[None, :], mask=mm)
            tl.atomic_add(DV + grows, ak[:, None] * grow[None, :], mask=mm)
            tl.store(DB + i * db_s + local, p * eb * diff, mask=m)      # e^b, not 1 + (e^b - 1)
        dptr = DQ + i * dq_s + r * dq_r + d
        tl.store(dptr, tl.load(dptr, mask=dm, other=0.0) + dq_acc, mask=dm)

    _KERNELS.update(fwd=_fwd_kernel, bwd=_bwd_kernel, next_power_of_2=triton.next_power_of_2)
    return _KERNELS


def _rows(t):
    """A 2-D ``[h or 1, n]`` operand: its stride between heads (0 when shared) and a unit last stride."""
    if t is None:
        return None, 0
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


class TritonBackend(Backend):
    """Fused Triton kernels (CUDA, or the Triton interpreter on CPU tensors): the correction's (this module) and
    window attention's (`sparse_bias.backends.triton_window`)."""

    name = "triton"
    supports = Supports(dtypes=(torch.float32, torch.float16, torch.bfloat16),
                        saves={"correction": "p", "window": "lse"}, auto_rank={"cuda": 0})
    description = "fused Triton kernels reading window rows straight from k / v (float32 accumulation)"
    head_block = None
    needs_contiguous = True
    block = 32

    def available(self):
        if not TRITON_AVAILABLE:
            return False, "triton is not installed (`pip install triton`: the triton extra)"
        return True, self.description

    def can_run(self, device, dtype, head_dim=None, op=None):
        if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Triton runs on CUDA (or on CPU tensors under TRITON_INTERPRET=1)"
        return super().can_run(device, dtype, head_dim, op)

    def _common(self, blk, q, k):
        dim = q.shape[-1]
        return dict(nq=blk.ent.queries, nk=k.shape[2], h0=blk.hs.start, heads=q.shape[1], D=dim,
                    DP=_kernels()["next_power_of_2"](dim), BLOCK=self.block)

    def forward_block(self, blk, qkv, lse, state, totals):
        den, removed, out = totals
        if blk.ent.nnz == 0 or blk.ent.rows == 0:
            return
        common = self._common(blk, *qkv[:2])
        (bv, bv_s), (em, em_s), (kp, kp_s) = _rows(blk.bvals), _rows(blk.emask), _rows(blk.keep)
        q, k, v = (t.contiguous() for t in qkv)
        lse = lse if lse.stride(-1) == 1 else lse.contiguous()
        if out.stride(-1) != 1 or den.stride(-1) != 1 or removed.stride() != den.stride():
            raise RuntimeError("the triton backend writes into outputs with a unit last stride")
        grid = (blk.ent.rows, blk.heads)
        _kernels()["fwd"][grid](q, k, v, lse, blk.ent.indptr, blk.ent.key, bv, em if em is not None else bv,
                                kp if kp is not None else bv, state, den, removed, out, scale=blk.call.scale,
                                lse_s=lse.stride(0), bv_s=bv_s, em_s=em_s, kp_s=kp_s, p_s=state.stride(0),
                                den_s=den.stride(0), out_s=out.stride(0), out_r=out.stride(1), HAS_EM=em is not None,
                                HAS_KP=kp is not None, **common)

    def backward_block(self, blk, qkv, upstream, state, grads):
        (gp, go), (p, _), (dq, dk, dv) = upstream, state, grads
        db = torch.zeros(blk.heads, blk.ent.nnz, dtype=blk.call.cdt, device=gp.device)
        if blk.ent.nnz == 0 or blk.ent.rows == 0:
            return db
        common = self._common(blk, *qkv[:2])
        (bv, bv_s), (kp, kp_s) = _rows(blk.bvals), _rows(blk.keep)
        q, k, v, gp = (t.contiguous() for t in qkv + (gp,))
        go = go if go.stride(-1) == 1 else go.contiguous()
        if not (dk.is_contiguous() and dv.is_contiguous() and dq.stride(-1) == 1):
            raise RuntimeError("the triton backend needs contiguous gradient buffers")
        direct = dk.dtype == torch.float32 and dv.dtype == torch.float32
        if direct:                                   # atomic adds straight into the float32 gradients
            gk, gv, dkv_heads, dkv_h0 = dk, dv, q.shape[1], blk.hs.start
        else:                                        # half precision: a float32 scratch of this block's heads
            gk, gv = (torch.zeros((dk.shape[0], blk.heads) + dk.shape[2:], dtype=torch.float32, device=dk.device)
                      for _ in range(2))
            dkv_heads, dkv_h0 = blk.heads, 0
        grid = (blk.ent.rows, blk.heads)
        _kernels()["bwd"][grid](q, k, v, gp, go, blk.ent.indptr, blk.ent.key, p, bv, kp if kp is not None else bv, dq,
                                gk, gv, db, dkv_heads=dkv_heads, dkv_h0=dkv_h0, scale=blk.call.scale, go_s=go.stride(0),
                                p_s=p.stride(0), bv_s=bv_s, kp_s=kp_s, dq_s=dq.stride(0), dq_r=dq.stride(1),
                                db_s=db.stride(0), HAS_KP=kp is not None, **common)
        if not direct:
            dk[:, blk.hs] += gk.to(dk.dtype)
            dv[:, blk.hs] += gv.to(dv.dtype)
        return db

    # window attention: the state kept for the backward is the window log-sum-exp [h, B * Q]

    def window_forward_block(self, blk, qkv, state, out):
        q, k, v = (t.contiguous() for t in qkv)
        triton_window.window_forward(q, k, v, blk.ent.indptr, blk.ent.key, blk.bvals, blk.emask, blk.keep,
                                     blk.call.scale, blk.hs.start, out, state)

    def window_backward_block(self, blk, qkv, upstream, state, grads):
        (g, go), (dq, dk, dv) = upstream, grads
        q, k, v = (t.contiguous() for t in qkv)
        db = torch.zeros(blk.heads, blk.ent.nnz, dtype=torch.float32, device=q.device)
        triton_window.window_backward(q, k, v, blk.ent.indptr, blk.ent.key, blk.bvals, blk.emask, blk.keep,
                                      blk.call.scale, blk.hs.start, g.contiguous(), go, state, dq, dk, dv, db)
        return db
