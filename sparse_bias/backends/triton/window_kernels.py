"""Triton kernels of window attention: attention restricted to each query's window keys.

One program per (row, head) -- grid ``(B * Q, h)`` over a block of ``h`` heads starting at ``h0`` -- walks the row's
entries in blocks with an online softmax (running max and sum, rescaled per block). For head ``i`` and row ``r``
(``hh = h0 + i``)::

    s_e      = scale * <q[b, hh, q], k[b, hh, key[e]]> + bvals[i, e] + emask[i, e]
    lse[i,r] = log(sum_{e in row r} exp(s_e))          (-inf for an empty or fully masked row)
    out[i,r] = sum_e exp(s_e - lse[i, r]) * keep[i, e] * v[b, hh, key[e]]

and the backward, with ``go[i, r] = <g, out[i, r]>`` and ``p_e`` recomputed from ``lse``::

    ds_e            = p_e * (keep_e * <g, v_e> - go[i, r])   (stored in db: the bias gradient)
    dq[i, r]       += scale * sum_e ds_e * k[b, hh, key[e]]
    dk[b, hh, key] += scale * ds_e * q[b, hh, q]              (atomic adds: keys are shared between rows)
    dv[b, hh, key] += p_e * keep_e * g[b, hh, q]

Masked (``-inf``) scores and empty rows give ``p = 0``, ``out = 0`` and ``lse = -inf`` without NaNs. Every load is
converted to float32 and all arithmetic runs in float32 registers. ``D`` is a runtime size, padded to ``DP``.

Importing this module imports triton (`sparse_bias.backends.triton.window` imports it on the first launch).
"""
import triton
import triton.language as tl

from .common_kernels import entry_block, window_row


@triton.jit
def _scores(qrow, krows, m, e, i, BV, EM, bv_s, em_s, scale, HAS_BIAS: tl.constexpr, HAS_EMASK: tl.constexpr):
    """``scale * <q, k_e> + bvals + emask`` of a block of entries ``[BLOCK]``; -inf outside the row."""
    s = tl.sum(krows * qrow[None, :], axis=1) * scale
    if HAS_BIAS:
        s += tl.load(BV + i * bv_s + e, mask=m, other=0.0).to(tl.float32)
    if HAS_EMASK:
        s += tl.load(EM + i * em_s + e, mask=m, other=0.0).to(tl.float32)
    return tl.where(m, s, float("-inf"))


@triton.jit
def window_forward_kernel(Q, K, V, INDPTR, KEY, BV, EM, KP, OUT, LSE,
                          nq, nk, heads, h0, D, scale,
                          bv_s, em_s, kp_s, out_s, out_r, lse_s,
                          DP: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EMASK: tl.constexpr,
                          HAS_KEEP: tl.constexpr):
    """Overwrites ``OUT`` ``[h, B * Q, D]`` and ``LSE`` ``[h, B * Q]`` (their own strides)."""
    r, i, b, bh, qk, start, end, d, dm = window_row(INDPTR, nq, heads, h0, D, DP)
    kv_base = bh * nk
    qrow = tl.load(Q + qk * D + d, mask=dm, other=0.0).to(tl.float32)
    m_i = tl.full([], float("-inf"), tl.float32)   # running max
    l_i = tl.zeros([], dtype=tl.float32)            # running sum of exp(s - m_i)
    acc = tl.zeros([DP], dtype=tl.float32)          # running sum of exp(s - m_i) * keep * v
    for e0 in range(start, end, BLOCK):
        m, e, key, rows, mm = entry_block(KEY, e0, end, kv_base, d, dm, D, BLOCK)
        krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
        s = _scores(qrow, krows, m, e, i, BV, EM, bv_s, em_s, scale, HAS_BIAS, HAS_EMASK)
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # all masked so far: exp(-inf) = 0, no NaN
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        if HAS_KEEP:
            p = p * tl.load(KP + i * kp_s + e, mask=m, other=0.0).to(tl.float32)
        vrows = tl.load(V + rows, mask=mm, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vrows, axis=0)
        m_i = m_new
    live = l_i != 0.0                                # empty or fully masked rows: lse = -inf, out = 0 (NaN stays)
    tl.store(LSE + i * lse_s + r, tl.where(live, m_i + tl.log(tl.where(live, l_i, 1.0)), float("-inf")))
    out = tl.where(live, acc / tl.where(live, l_i, 1.0), 0.0)
    tl.store(OUT + i * out_s + r * out_r + d, out, mask=dm)


@triton.jit
def window_backward_kernel(Q, K, V, G, GO, LSE, INDPTR, KEY, BV, EM, KP, DQ, DK, DV, DB,
                           nq, nk, heads, h0, D, dkv_heads, dkv_h0, scale,
                           bv_s, em_s, kp_s, go_s, lse_s, dq_s, dq_r, db_s,
                           DP: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EMASK: tl.constexpr,
                           HAS_KEEP: tl.constexpr):
    """Adds into ``DQ`` ``[h, B * Q, D]`` and the float32 ``DK`` / ``DV`` ``[B, dkv_heads, K, D]`` (head
    ``dkv_h0 + i``); stores ``ds`` into ``DB`` ``[h, nnz]``."""
    r, i, b, bh, qk, start, end, d, dm = window_row(INDPTR, nq, heads, h0, D, DP)
    kv_base = bh * nk
    dkv_base = (b * dkv_heads + dkv_h0 + i) * nk   # this head's rows in dk / dv (or in the float32 scratch)
    qrow = tl.load(Q + qk * D + d, mask=dm, other=0.0).to(tl.float32)
    grow = tl.load(G + qk * D + d, mask=dm, other=0.0).to(tl.float32)
    go = tl.load(GO + i * go_s + r).to(tl.float32)
    lse = tl.load(LSE + i * lse_s + r).to(tl.float32)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)   # a dead row: exp(s - inf) = 0, no NaN
    dq_acc = tl.zeros([DP], dtype=tl.float32)
    for e0 in range(start, end, BLOCK):
        m, e, key, rows, mm = entry_block(KEY, e0, end, kv_base, d, dm, D, BLOCK)
        krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
        s = _scores(qrow, krows, m, e, i, BV, EM, bv_s, em_s, scale, HAS_BIAS, HAS_EMASK)
        p = tl.where(m, tl.exp(s - lse), 0.0)
        vrows = tl.load(V + rows, mask=mm, other=0.0).to(tl.float32)
        gv = tl.sum(vrows * grow[None, :], axis=1)    # <g, v_e>
        pk = p
        if HAS_KEEP:
            keep = tl.load(KP + i * kp_s + e, mask=m, other=0.0).to(tl.float32)
            gv = gv * keep
            pk = p * keep
        ds = p * (gv - go)
        dq_acc += tl.sum(ds[:, None] * krows, axis=0)
        grows = (dkv_base + key)[:, None] * D + d[None, :]
        tl.atomic_add(DK + grows, (ds * scale)[:, None] * qrow[None, :], mask=mm)
        tl.atomic_add(DV + grows, pk[:, None] * grow[None, :], mask=mm)
        tl.store(DB + i * db_s + e, ds, mask=m)
    dptr = DQ + i * dq_s + r * dq_r + d
    tl.store(dptr, tl.load(dptr, mask=dm, other=0.0) + dq_acc * scale, mask=dm)
