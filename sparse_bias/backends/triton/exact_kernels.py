"""Triton kernels of the exact rows of the correction: dense biased attention of the flagged rows, decided on the
device.

One program per (row, head) over *every* row -- grid ``(B * Q, H)`` --: a program whose row is not flagged in
``FLAGS`` ``[B * Q]`` returns at once; a flagged one evaluates its row exactly, flash-style over key blocks (online
softmax, float32 registers) with the bias added inside the loop. The row's window entries are sorted by key, so each
key block takes the next entries below its end from a pointer that only moves forward. The backward recomputes the
row's log-sum-exp in a first pass and then, per key block, ``ds = p (keep <g, v_j> - <g, o>)``: ``dq`` in registers,
``dk`` / ``dv`` by atomic adds into float32 ``[B, H, K, D]`` buffers, the bias gradient at the window entries.
Dropout uses the counter hash of `sparse_bias.backends.triton.common_kernels.dropout_keep`. Offsets are int64.

Importing this module imports triton (`sparse_bias.backends.triton.exact` imports it on the first launch).
"""
import triton
import triton.language as tl

from .common_kernels import dropout_keep


@triton.jit
def _flagged(FLAGS):
    """This program's ``(r, hh, flagged)``: its global row ``b * Q + q`` and head (int64), and whether the row is
    flagged."""
    r = tl.program_id(0).to(tl.int64)
    return r, tl.program_id(1).to(tl.int64), tl.load(FLAGS + r) != 0


@triton.jit
def _row(X, r, hh, nq, heads, D: tl.constexpr, DP: tl.constexpr):
    """Row ``r`` of head ``hh``: ``(b, qi, bh, d, dm, x [DP] float32)`` -- the batch element, the query, the
    ``[B, H]`` slot, the feature offsets and mask, and the row of ``X`` ``[B, H, Q, D]``."""
    b = r // nq
    qi = r - b * nq
    bh = b * heads + hh
    d = tl.arange(0, DP)
    dm = d < D
    return b, qi, bh, d, dm, tl.load(X + (bh * nq + qi) * D + d, mask=dm, other=0.0).to(tl.float32)


@triton.jit
def _keys(X, bh, nk, cols, cm, d, dm, D: tl.constexpr):
    """Rows ``cols`` of ``X`` ``[B, H, K, D]`` for slot ``bh``: ``[BN, DP]`` float32, zero outside the keys."""
    return tl.load(X + (bh * nk + cols)[:, None] * D + d[None, :], mask=cm[:, None] & dm[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _tile_scores(q, K, M, KEY, BV, b, hh, qi, bh, nk, k0, ptr, end, scale, bv_s, m_sb, m_sh, m_sq, m_sk,
                 d, dm, D: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr):
    """One key block of a row: ``(s [BN] with mask and bias, k [BN, DP], cols, in range, entries, their keys,
    entry in block, next pointer)``; ``-inf`` outside the keys."""
    cols = k0 + tl.arange(0, BN)
    cm = cols < nk
    k = _keys(K, bh, nk, cols, cm, d, dm, D)
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
    """The online softmax of one row over every key block, bias inside: ``(max, sum, sum of p keep v [DP])``."""
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
            pe = tl.where(dropout_keep(flat, seed_lo, seed_hi, p), pe * inv, 0.0)
        acc = acc * alpha + tl.sum(pe[:, None] * _keys(V, bh, nk, cols, cm, d, dm, D), axis=0)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def exact_forward_kernel(Q, K, V, M, INDPTR, KEY, BV, FLAGS, OUT, nq, nk, heads, total, offset, scale, p, seed_lo,
                         seed_hi, bv_s, m_sb, m_sh, m_sq, m_sk, out_s, out_r,
                         D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr,
                         DROP: tl.constexpr):
    """Overwrites the flagged rows of ``OUT`` ``[H, B * Q, D]`` (float32, its own strides)."""
    r, hh, flagged = _flagged(FLAGS)
    if flagged:
        b, qi, bh, d, dm, q = _row(Q, r, hh, nq, heads, D, DP)
        m_i, l_i, acc = _row_pass(q, K, V, M, KEY, BV, b, hh, qi, bh, nq, nk, tl.load(INDPTR + r),
                                  tl.load(INDPTR + r + 1), total, offset, scale, p, seed_lo, seed_hi, bv_s, m_sb,
                                  m_sh, m_sq, m_sk, d, dm, D, DP, BN, HAS_M, DROP)
        o = tl.where(l_i == 0, 0.0, acc / l_i)              # a fully masked row: zeros
        tl.store(OUT + hh * out_s + r * out_r + d, o, mask=dm)


@triton.jit
def exact_backward_kernel(Q, K, V, G, M, INDPTR, KEY, BV, FLAGS, DQ, DK, DV, DB, nq, nk, heads, total, offset,
                          scale, p, seed_lo, seed_hi, bv_s, m_sb, m_sh, m_sq, m_sk, db_s,
                          D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr,
                          DROP: tl.constexpr):
    """Adds the flagged rows' gradients into ``DQ`` ``[B, H, Q, D]`` and the float32 ``DK`` / ``DV``
    ``[B, H, K, D]``; stores their bias gradient at the window entries into ``DB`` ``[H, nnz]``."""
    r, hh, flagged = _flagged(FLAGS)
    if flagged:
        b, qi, bh, d, dm, q = _row(Q, r, hh, nq, heads, D, DP)
        g = tl.load(G + (bh * nq + qi) * D + d, mask=dm, other=0.0).to(tl.float32)
        start = tl.load(INDPTR + r)
        end = tl.load(INDPTR + r + 1)
        inv = 1.0 / (1.0 - p)
        # pass 1: the row's log-sum-exp and <g, o>
        m_i, l_i, acc = _row_pass(q, K, V, M, KEY, BV, b, hh, qi, bh, nq, nk, start, end, total, offset, scale,
                                  p, seed_lo, seed_hi, bv_s, m_sb, m_sh, m_sq, m_sk, d, dm, D, DP, BN, HAS_M,
                                  DROP)
        if l_i != 0:                                  # a fully masked row has no gradient (NaN: NaN ones)
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
                dp = tl.sum(_keys(V, bh, nk, cols, cm, d, dm, D) * g[None, :], axis=1)
                if DROP:
                    flat = (bh * nq + qi) * total + offset + cols
                    z = tl.where(dropout_keep(flat, seed_lo, seed_hi, p), inv, 0.0)
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
