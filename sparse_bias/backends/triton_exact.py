"""Triton kernels for the exact rows of the correction: dense biased attention of the flagged rows, decided on the
device.

`sparse_bias._core.exact_rows` flags the rows where the additive correction would cancel. On a GPU their number is a
device value; reading it would stall the host. These kernels run one program per (row, head) over *every* row:
a program whose row is not flagged returns at once, a flagged one evaluates its row exactly -- flash-style over
key blocks (online softmax, float32 registers) with the bias added inside the loop: the row's window entries are
sorted by key, so each key block takes the next entries below its end from a pointer that only moves forward
(FlexAttention's ``score_mod`` with the sparse index instead of a block mask). No host read, no capacity: any
number of flagged rows is exact. The backward recomputes the row's log-sum-exp in a first pass and then, per key
block, ``ds = p (<g, v_j> - <g, o>)``: ``dq`` in registers, ``dk`` / ``dv`` by atomic adds into float32 buffers,
the bias gradient at the window entries.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``), which is how the
tests check it. Offsets are int64.
"""
from __future__ import annotations

import importlib.util

import torch

from .._core.call import Call
from ..dense import triton_dense

__all__ = ["runs_on", "exact_forward", "exact_backward"]

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
BLOCK_N = 32

_KERNELS = {}


def runs_on(device: torch.device) -> bool:
    """Whether the kernels serve rows on ``device`` by default (CUDA with Triton installed)."""
    return TRITON_AVAILABLE and device.type == "cuda"


def _kernels():
    """Compile-on-first-use (Triton is a heavy import)."""
    global triton, tl, _keep, _tile_scores, _row_pass  # module globals: jitted functions resolve names through them
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    _keep = triton_dense._kernels() and triton_dense._keep          # the counter-hash keep decision, shared

    @triton.jit
    def _tile_scores(q, K, M, KEY, BV, b, hh, qi, bh, nk, k0, ptr, end, scale, bv_s, m_sb, m_sh, m_sq, m_sk,
                     d, dm, D: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr):
        """One key block of a row: ``(s [BN] with mask and bias, k [BN, DP], cols, in range, entries, their keys,
        entry in block, next pointer)``; ``-inf`` outside the keys."""
        cols = k0 + tl.arange(0, BN)
        cm = cols < nk
        k = tl.load(K + (bh * nk + cols)[:, None] * D + d[None, :], mask=cm[:, None] & dm[None, :],
                    other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * scale
        if HAS_M:
            s += tl.load(M + b * m_sb + hh * m_sh + qi * m_sq + cols * m_sk, mask=cm, other=0.0)
        e = ptr + tl.arange(0, BN)                  # the row's next entries: at most BN fall in this block
        em = e < end
        ek = tl.load(KEY + e, mask=em, other=-1)
        inb = em & (ek < k0 + BN)
        bv = tl.load(BV + hh * bv_s + e, mask=inb, other=0.0)
        hit = (ek[:, None] == cols[None, :]) & inb[:, None]
        s += tl.sum(tl.where(hit, bv[:, None], 0.0), axis=0)
        s = tl.where(cm, s, float("-inf"))
        return s, k, cols, cm, e, hit, inb, ptr + tl.sum(inb.to(tl.int64), axis=0)

    @triton.jit
    def _row_pass(q, K, V, M, KEY, BV, b, hh, qi, bh, nq, nk, ptr, end, total, offset, scale, p, seed_lo, seed_hi,
                  bv_s, m_sb, m_sh, m_sq, m_sk, d, dm, D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
                  HAS_M: tl.constexpr, DROP: tl.constexpr):
        """The online softmax of one row over every key block, bias inside: ``(max, sum, sum of p keep v)``."""
        m_i = tl.max(tl.full([BN], float("-inf"), tl.float32), axis=0)
        l_i = tl.sum(tl.zeros([BN], tl.float32), axis=0)
        acc = tl.zeros([DP], tl.float32)
        inv = 1.0 / (1.0 - p)
        for k0 in range(0, nk, BN):
            s, k, cols, cm, e, hit, inb, ptr = _tile_scores(q, K, M, KEY, BV, b, hh, qi, bh, nk, k0, ptr, end,
                                                            scale, bv_s, m_sb, m_sh, m_sq, m_sk, d, dm, D, BN, HAS_M)
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m_i - m_safe)
            pe = tl.exp(s - m_safe)
            l_i = l_i * alpha + tl.sum(pe, axis=0)
            if DROP:
                flat = (bh * nq + qi) * total + offset + cols
                pe = tl.where(_keep(flat, seed_lo, seed_hi, p), pe * inv, 0.0)
            v = tl.load(V + (bh * nk + cols)[:, None] * D + d[None, :], mask=cm[:, None] & dm[None, :],
                        other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(pe[:, None] * v, axis=0)
            m_i = m_new
        return m_i, l_i, acc

    @triton.jit
    def _fwd(Q, K, V, M, INDPTR, KEY, BV, FLAGS, OUT, nq, nk, heads, total, offset, scale, p, seed_lo, seed_hi,
             bv_s, m_sb, m_sh, m_sq, m_sk, out_s, out_r,
             D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr, DROP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)          # global row b * Q + q
        hh = tl.program_id(1).to(tl.int64)
        if tl.load(FLAGS + r) != 0:
            b = r // nq
            qi = r - b * nq
            bh = b * heads + hh
            d = tl.arange(0, DP)
            dm = d < D
            q = tl.load(Q + (bh * nq + qi) * D + d, mask=dm, other=0.0).to(tl.float32)
            m_i, l_i, acc = _row_pass(q, K, V, M, KEY, BV, b, hh, qi, bh, nq, nk, tl.load(INDPTR + r),
                                      tl.load(INDPTR + r + 1), total, offset, scale, p, seed_lo, seed_hi, bv_s, m_sb,
                                      m_sh, m_sq, m_sk, d, dm, D, DP, BN, HAS_M, DROP)
            o = tl.where(l_i == 0, 0.0, acc / l_i)              # a fully masked row: zeros
            tl.store(OUT + hh * out_s + r * out_r + d, o, mask=dm)

    @triton.jit
    def _bwd(Q, K, V, G, M, INDPTR, KEY, BV, FLAGS, DQ, DK, DV, DB, nq, nk, heads, total, offset, scale, p,
             seed_lo, seed_hi, bv_s, m_sb, m_sh, m_sq, m_sk, db_s,
             D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr, DROP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        hh = tl.program_id(1).to(tl.int64)
        if tl.load(FLAGS + r) != 0:
            b = r // nq
            qi = r - b * nq
            bh = b * heads + hh
            d = tl.arange(0, DP)
            dm = d < D
            q = tl.load(Q + (bh * nq + qi) * D + d, mask=dm, other=0.0).to(tl.float32)
            g = tl.load(G + (bh * nq + qi) * D + d, mask=dm, other=0.0).to(tl.float32)
            start = tl.load(INDPTR + r)
            end = tl.load(INDPTR + r + 1)
            inv = 1.0 / (1.0 - p)
            # pass 1: the row's log-sum-exp and <g, o>
            m_i, l_i, acc = _row_pass(q, K, V, M, KEY, BV, b, hh, qi, bh, nq, nk, start, end, total, offset, scale,
                                      p, seed_lo, seed_hi, bv_s, m_sb, m_sh, m_sq, m_sk, d, dm, D, DP, BN, HAS_M,
                                      DROP)
            if l_i > 0:                                   # a fully masked row has no gradient
                lse = m_i + tl.log(l_i)
                delta = tl.sum(g * acc, axis=0) / l_i                                   # <g, o>
                dq = tl.zeros([DP], tl.float32)
                ptr = start
                # pass 2: ds = p (keep <g, v_j> - <g, o>) per key block
                for k0 in range(0, nk, BN):
                    s, k, cols, cm, e, hit, inb, ptr = _tile_scores(q, K, M, KEY, BV, b, hh, qi, bh, nk, k0, ptr,
                                                                    end, scale, bv_s, m_sb, m_sh, m_sq, m_sk, d, dm,
                                                                    D, BN, HAS_M)
                    pr = tl.where(cm, tl.exp(s - lse), 0.0)
                    v = tl.load(V + (bh * nk + cols)[:, None] * D + d[None, :], mask=cm[:, None] & dm[None, :],
                                other=0.0).to(tl.float32)
                    dp = tl.sum(v * g[None, :], axis=1)
                    if DROP:
                        flat = (bh * nq + qi) * total + offset + cols
                        z = tl.where(_keep(flat, seed_lo, seed_hi, p), inv, 0.0)
                        pz = pr * z
                        ds = pr * (dp * z - delta)
                    else:
                        pz = pr
                        ds = pr * (dp - delta)
                    dq += tl.sum(ds[:, None] * k, axis=0) * scale
                    kv = (bh * nk + cols)[:, None] * D + d[None, :]
                    kvm = cm[:, None] & dm[None, :]
                    tl.atomic_add(DK + kv, (ds * scale)[:, None] * q[None, :], mask=kvm)
                    tl.atomic_add(DV + kv, pz[:, None] * g[None, :], mask=kvm)
                    tl.store(DB + hh * db_s + e, tl.sum(tl.where(hit, ds[None, :], 0.0), axis=1), mask=inb)
                dptr = DQ + (bh * nq + qi) * D + d
                tl.store(dptr, tl.load(dptr, mask=dm, other=0.0) + dq, mask=dm)

    _KERNELS.update(fwd=_fwd, bwd=_bwd, next_power_of_2=triton.next_power_of_2)
    return _KERNELS


def _args(q, k, values, ent, call: Call):
    """The kernels' common arguments: the call's (`sparse_bias.dense.triton_dense.call_args`: the additive mask in
    float32 with broadcast strides 0, key range, scale, dropout), bias values ``[H|1, nnz]`` in float32 (stride 0
    over heads when shared), the sizes."""
    mask, args = triton_dense.call_args(k, call)
    vals = values.to(torch.float32)
    bv, bv_s = (vals.unsqueeze(0), 0) if vals.dim() == 1 else (vals.t().contiguous(), ent.nnz)
    dim = q.shape[-1]
    return mask, bv, dict(args, nq=ent.queries, nk=k.shape[2], heads=q.shape[1], bv_s=bv_s, D=dim,
                          DP=max(16, _kernels()["next_power_of_2"](dim)), BN=BLOCK_N)


def exact_forward(qkv, values: torch.Tensor, ent, call: Call, flags: torch.Tensor, out: torch.Tensor) -> None:
    """Overwrite the rows flagged in ``flags [B, Q]`` of ``out [H, B * Q, D]`` (float32, unit last stride) with
    their dense biased attention. ``values`` ``[nnz]`` or ``[nnz, H]``."""
    if ent.nnz == 0 or out.numel() == 0:
        return
    q, k, v = (t.contiguous() for t in qkv)
    if out.dtype != torch.float32 or out.stride(-1) != 1:
        raise RuntimeError("the exact-row kernels write float32 outputs with a unit last stride")
    mask, bv, args = _args(q, k, values, ent, call)
    grid = (ent.rows, q.shape[1])
    _kernels()["fwd"][grid](q, k, v, mask if mask is not None else bv, ent.indptr, ent.key, bv,
                            flags.reshape(-1).to(torch.int8), out, out_s=out.stride(0), out_r=out.stride(1), **args)


def exact_backward(grad_out, qkv, values: torch.Tensor, ent, call: Call, flags: torch.Tensor, grads) -> None:
    """Add the flagged rows' gradients for ``grad_out [B, H, Q, D]`` into ``grads = (dq [B, H, Q, D] float32
    contiguous, dvalues ``[nnz]`` / ``[nnz, H]`` float32 or None, dk, dv [B, H, K, D])``."""
    dq, dvalues, dk, dv = grads
    if ent.nnz == 0 or dq.numel() == 0:
        return
    q, k, v, g = (t.contiguous() for t in tuple(qkv) + (grad_out,))
    if dq.dtype != torch.float32 or not dq.is_contiguous():
        raise RuntimeError("the exact-row kernels add into a contiguous float32 dq")
    mask, bv, args = _args(q, k, values, ent, call)
    heads = q.shape[1]
    gk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)      # atomic adds need float32
    gv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    db = torch.zeros(heads, ent.nnz, dtype=torch.float32, device=q.device)
    grid = (ent.rows, heads)
    _kernels()["bwd"][grid](q, k, v, g, mask if mask is not None else bv, ent.indptr, ent.key, bv,
                            flags.reshape(-1).to(torch.int8), dq, gk, gv, db, db_s=db.stride(0), **args)
    dk += gk.to(dk.dtype)
    dv += gv.to(dv.dtype)
    if dvalues is not None:
        dvalues += db.sum(0) if dvalues.dim() == 1 else db.t()
