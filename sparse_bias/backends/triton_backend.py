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
    def _entries(KEY, e0, end, e_begin, kv_base, d, dm, D: tl.constexpr, BLOCK: tl.constexpr):
        """A block of window entries: validity, index into the batch element's entries (int64), the key of
        each entry (int64), the offsets of their k/v rows and the 2-D load mask."""
        e = e0 + tl.arange(0, BLOCK)
        m = e < end
        key = tl.load(KEY + e, mask=m, other=0).to(tl.int64)
        return m, (e - e_begin).to(tl.int64), key, (kv_base + key)[:, None] * D + d[None, :], m[:, None] & dm[None, :]

    @triton.jit
    def _fwd_kernel(Q, K, V, LSE, INDPTR, KEY, BV, EM, KP, P, DEN, OUT,
                    row0, e_begin, nq, nk, h0, heads, scale,
                    lse_s, bv_s, em_s, kp_s, p_s, den_s, out_s, out_r,
                    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, HAS_EM: tl.constexpr,
                    HAS_KP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)          # query within the batch element
        i = tl.program_id(1).to(tl.int64)          # head within the block
        b = row0 // nq
        bh = b * heads + h0 + i                    # int64 (i is): offsets below cannot overflow
        kv_base = bh * nk
        start = tl.load(INDPTR + row0 + r)
        end = tl.load(INDPTR + row0 + r + 1)
        d = tl.arange(0, DP)
        dm = d < D
        qrow = tl.load(Q + (bh * nq + r) * D + d, mask=dm, other=0.0).to(tl.float32)
        lse = tl.load(LSE + i * lse_s + r)
        s_tot = tl.zeros([BLOCK], dtype=tl.float32)
        c_acc = tl.zeros([DP], dtype=tl.float32)
        for e0 in range(start, end, BLOCK):
            m, local, key, rows, mm = _entries(KEY, e0, end, e_begin, kv_base, d, dm, D, BLOCK)
            krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
            s = tl.sum(krows * qrow[None, :], axis=1) * scale
            if HAS_EM:
                s += tl.load(EM + i * em_s + local, mask=m, other=0.0)
            p = tl.where(m, tl.exp(s - lse), 0.0)
            tl.store(P + i * p_s + local, p, mask=m)
            a = p * (tl.exp(tl.load(BV + i * bv_s + local, mask=m, other=0.0)) - 1.0)
            s_tot += a
            if HAS_KP:
                a = a * tl.load(KP + i * kp_s + local, mask=m, other=0.0)
            c_acc += tl.sum(a[:, None] * tl.load(V + rows, mask=mm, other=0.0).to(tl.float32), axis=0)
        tl.store(DEN + i * den_s + r, tl.load(DEN + i * den_s + r) + tl.sum(s_tot, axis=0))
        optr = OUT + i * out_s + r * out_r + d      # the output's own strides (a view of the dense pass's)
        tl.store(optr, tl.load(optr, mask=dm, other=0.0) + c_acc, mask=dm)

    @triton.jit
    def _bwd_kernel(Q, K, V, GP, GO, INDPTR, KEY, P, BV, KP, DQ, DK, DV, DB,
                    row0, e_begin, nq, nk, h0, heads, dkv_bh0, scale,
                    go_s, p_s, bv_s, kp_s, dq_s, dq_r, db_s,
                    D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, HAS_KP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1).to(tl.int64)
        b = row0 // nq
        bh = b * heads + h0 + i
        qk = bh * nq + r
        kv_base = bh * nk
        dkv_base = (dkv_bh0 + i) * nk             # the gradients' (or the float32 scratch's) rows of this head
        start = tl.load(INDPTR + row0 + r)
        end = tl.load(INDPTR + row0 + r + 1)
        d = tl.arange(0, DP)
        dm = d < D
        qrow = tl.load(Q + qk * D + d, mask=dm, other=0.0).to(tl.float32)
        grow = tl.load(GP + qk * D + d, mask=dm, other=0.0)
        go = tl.load(GO + i * go_s + r)
        dq_acc = tl.zeros([DP], dtype=tl.float32)
        for e0 in range(start, end, BLOCK):
            m, local, key, rows, mm = _entries(KEY, e0, end, e_begin, kv_base, d, dm, D, BLOCK)
            grows = (dkv_base + key)[:, None] * D + d[None, :]
            p = tl.load(P + i * p_s + local, mask=m, other=0.0)
            a = p * (tl.exp(tl.load(BV + i * bv_s + local, mask=m, other=0.0)) - 1.0)
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
            tl.store(DB + i * db_s + local, (p + a) * diff, mask=m)
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
    """Fused Triton kernels (CUDA, or the Triton interpreter on CPU tensors); the correction only."""

    name = "triton"
    supports = Supports(ops=("correction",), dtypes=(torch.float32, torch.float16, torch.bfloat16),
                        auto_rank={"cuda": 0})
    description = "fused Triton kernels reading window rows straight from k / v (float32 accumulation)"
    head_block = None
    needs_contiguous = True
    block = 32

    def available(self):
        if not TRITON_AVAILABLE:
            return False, "triton is not installed (pip install sparse_bias[triton])"
        return True, self.description

    def can_run(self, device, dtype, head_dim=None, op=None):
        if torch.device(device).type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "Triton runs on CUDA (or on CPU tensors under TRITON_INTERPRET=1)"
        return super().can_run(device, dtype, head_dim, op)

    def _common(self, win, b, hs, q, k):
        e_begin, e_end = win.batch_range(b)
        dim = q.shape[-1]
        return e_begin, e_end, dict(row0=b * win.num_queries, e_begin=e_begin, nq=win.num_queries, nk=k.shape[2],
                                    h0=hs.start, heads=q.shape[1], D=dim, DP=_kernels()["next_power_of_2"](dim),
                                    BLOCK=self.block)

    def forward_block(self, win, blk, qkv, lse, state, totals):
        b, hs = blk.b, blk.hs
        den, out = totals
        e_begin, e_end, common = self._common(win, b, hs, *qkv[:2])
        if e_end == e_begin:
            return
        (bv, bv_s), (em, em_s), (kp, kp_s) = _rows(blk.bvals), _rows(blk.emask), _rows(blk.keep)
        q, k, v, lse = (t.contiguous() for t in qkv + (lse,))
        if out.stride(-1) != 1 or den.stride(-1) != 1:
            raise RuntimeError("the triton backend writes into outputs with a unit last stride")
        grid = (win.num_queries, hs.stop - hs.start)
        _kernels()["fwd"][grid](q, k, v, lse, win.indptr, win.key, bv, em if em is not None else bv,
                                kp if kp is not None else bv, state, den, out, scale=blk.call.scale,
                                lse_s=lse.stride(0), bv_s=bv_s, em_s=em_s, kp_s=kp_s, p_s=state.stride(0),
                                den_s=den.stride(0), out_s=out.stride(0), out_r=out.stride(1), HAS_EM=em is not None,
                                HAS_KP=kp is not None, **common)

    def backward_block(self, win, blk, qkv, upstream, state, grads):
        b, hs = blk.b, blk.hs
        (gp, go), (p, _), (dq, dk, dv) = upstream, state, grads
        e_begin, e_end, common = self._common(win, b, hs, *qkv[:2])
        db = torch.zeros(hs.stop - hs.start, e_end - e_begin, dtype=blk.call.cdt, device=gp.device)
        if e_end == e_begin:
            return db
        (bv, bv_s), (kp, kp_s) = _rows(blk.bvals), _rows(blk.keep)
        q, k, v, gp = (t.contiguous() for t in qkv + (gp,))
        if not (dk.is_contiguous() and dv.is_contiguous() and dq.stride(-1) == 1):
            raise RuntimeError("the triton backend needs contiguous gradient buffers")
        direct = dk.dtype == torch.float32 and dv.dtype == torch.float32
        if direct:                                   # atomic adds straight into the float32 gradients
            gk, gv, dkv_bh0 = dk, dv, b * q.shape[1] + hs.start
        else:                                        # half precision: a float32 scratch of this block's heads
            gk, gv = (torch.zeros((hs.stop - hs.start,) + dk.shape[2:], dtype=torch.float32, device=dk.device)
                      for _ in range(2))
            dkv_bh0 = 0
        grid = (win.num_queries, hs.stop - hs.start)
        _kernels()["bwd"][grid](q, k, v, gp, go, win.indptr, win.key, p, bv, kp if kp is not None else bv, dq, gk, gv,
                                db, dkv_bh0=dkv_bh0, scale=blk.call.scale, go_s=go.stride(0), p_s=p.stride(0),
                                bv_s=bv_s, kp_s=kp_s, dq_s=dq.stride(0), dq_r=dq.stride(1), db_s=db.stride(0),
                                HAS_KP=kp is not None, **common)
        if not direct:
            dk[b, hs] += gk.to(dk.dtype)
            dv[b, hs] += gv.to(dv.dtype)
        return db
