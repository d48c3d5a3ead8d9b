"""Triton kernels of the dense pass with the counter-hash attention dropout: flash-style attention over key blocks.

Forward: one program per (query block, ``b * H + h``) -- grid ``(cdiv(Q, BM), B * H)`` -- runs an online softmax over
key blocks with the keep decision (`sparse_bias.backends.triton.common_kernels.dropout_keep`) hashed in registers
inside the block loop (never stored), float32 accumulation, and stores the output ``[B, H, Q, D]`` (the inputs'
dtype) and the log-sum-exp of the undropped scores ``[B, H, Q]``. Backward: two race-free passes recomputing
probabilities and decisions -- ``dk`` / ``dv`` per key block (grid ``(cdiv(K, BN), B * H)``), ``dq`` per query block.
The additive mask ``M`` is read through four strides (0 on broadcast dims); the flat index of score ``(bh, q, key)``
is ``(bh * Q + q) * total + offset + key`` (``offset`` / ``total``: the call's key range).

Importing this module imports triton (`sparse_bias.backends.triton.dense` imports it on the first launch).
"""
import triton
import triton.language as tl

from .common_kernels import dropout_keep


@triton.jit
def _block(start, n, BLOCK: tl.constexpr):
    """Indices ``start .. start + BLOCK - 1`` (in ``start``'s integer type) and whether each is below ``n``."""
    idx = start + tl.arange(0, BLOCK)
    return idx, idx < n


@triton.jit
def _program(heads, DP: tl.constexpr, D: tl.constexpr):
    """This program's ``(bh, b, h, d, dm)``: its ``b * H + h`` (int64), feature offsets ``[DP]`` and mask."""
    bh = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, DP)
    return bh, bh // heads, bh % heads, d, d < D


@triton.jit
def _tile(PTR, base, idx, ok, d, dm, D: tl.constexpr, IEEE: tl.constexpr):
    """Rows ``idx`` (masked by ``ok``) of a ``[.., N, D]`` tensor starting at row ``base``; float32 with IEEE."""
    t = tl.load(PTR + (base + idx[:, None]) * D + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
    if IEEE:
        t = t.to(tl.float32)
    return t


@triton.jit
def _query_block(Q, G, LSE, DELTA, bh, nq, rows, rm, d, dm, D: tl.constexpr, IEEE: tl.constexpr):
    """The backward's operands of a query block: ``(q, g [BM, DP], lse, delta [BM])``."""
    q = _tile(Q, bh * nq, rows, rm, d, dm, D, IEEE)
    g = _tile(G, bh * nq, rows, rm, d, dm, D, IEEE)
    lse = tl.load(LSE + bh * nq + rows, mask=rm, other=0.0)
    delta = tl.load(DELTA + bh * nq + rows, mask=rm, other=0.0)
    return q, g, lse, delta


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b`` with float32 accumulation: IEEE float32 (no TF32), or ``a`` cast to ``b``'s half dtype."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _scores(q, k, M, b, h, rows, cols, rm, cm, scale, m_sb, m_sh, m_sq, m_sk, HAS_M: tl.constexpr,
            IEEE: tl.constexpr):
    """``scale q k^T + mask`` of one block ``[BM, BN]``, -inf outside the key range."""
    s = _dot(q, tl.trans(k), IEEE) * scale
    if HAS_M:
        s += tl.load(M + b * m_sb + h * m_sh + rows[:, None] * m_sq + cols[None, :] * m_sk,
                     mask=rm[:, None] & cm[None, :], other=0.0)
    return tl.where(cm[None, :], s, float("-inf"))


@triton.jit
def _probs(q, k, g, v, lse, delta, M, b, h, bh, rows, cols, rm, cm, nq, total, offset, scale, p, seed_lo,
           seed_hi, m_sb, m_sh, m_sq, m_sk, HAS_M: tl.constexpr, DROP: tl.constexpr, IEEE: tl.constexpr):
    """``(p * keep, ds)`` ``[BM, BN]`` of one block of the backward."""
    s = _scores(q, k, M, b, h, rows, cols, rm, cm, scale, m_sb, m_sh, m_sq, m_sk, HAS_M, IEEE)
    pr = tl.where(rm[:, None] & cm[None, :], tl.exp(s - lse[:, None]), 0.0)
    dp = _dot(g, tl.trans(v), IEEE)
    if DROP:
        flat = ((bh * nq + rows) * total)[:, None] + offset + cols[None, :]
        z = tl.where(dropout_keep(flat, seed_lo, seed_hi, p), 1.0 / (1.0 - p), 0.0)
        return pr * z, pr * (dp * z - delta[:, None])
    return pr, pr * (dp - delta[:, None])


@triton.jit
def dense_forward_kernel(Q, K, V, M, OUT, LSE, nq, nk, heads, total, offset, scale, p, seed_lo, seed_hi,
                         m_sb, m_sh, m_sq, m_sk,
                         D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                         HAS_M: tl.constexpr, DROP: tl.constexpr, IEEE: tl.constexpr):
    """Stores ``OUT`` ``[B, H, Q, D]`` and ``LSE`` ``[B, H, Q]`` (contiguous)."""
    bh, b, h, d, dm = _program(heads, DP, D)
    rows, rm = _block(tl.program_id(0).to(tl.int64) * BM, nq, BM)
    q = _tile(Q, bh * nq, rows, rm, d, dm, D, IEEE)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, DP], tl.float32)
    inv = 1.0 / (1.0 - p)
    for n0 in range(0, nk, BN):
        cols, cm = _block(n0, nk, BN)
        k = _tile(K, bh * nk, cols, cm, d, dm, D, IEEE)
        s = _scores(q, k, M, b, h, rows, cols, rm, cm, scale, m_sb, m_sh, m_sq, m_sk, HAS_M, IEEE)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # rows masked so far: add nothing
        alpha = tl.exp(m_i - m_safe)
        pe = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(pe, 1)
        if DROP:
            flat = ((bh * nq + rows) * total)[:, None] + offset + cols[None, :]
            pe = tl.where(dropout_keep(flat, seed_lo, seed_hi, p), pe * inv, 0.0)
        acc = acc * alpha[:, None] + _dot(pe, _tile(V, bh * nk, cols, cm, d, dm, D, IEEE), IEEE)
        m_i = m_new
    out = tl.where(l_i[:, None] == 0, 0.0, acc / l_i[:, None])      # a fully masked row: zeros
    tl.store(OUT + (bh * nq + rows[:, None]) * D + d[None, :], out.to(OUT.dtype.element_ty),
             mask=rm[:, None] & dm[None, :])
    tl.store(LSE + bh * nq + rows, m_i + tl.log(l_i), mask=rm)


@triton.jit
def dense_backward_kv_kernel(Q, K, V, G, LSE, DELTA, M, DK, DV, nq, nk, heads, total, offset, scale, p, seed_lo,
                             seed_hi, m_sb, m_sh, m_sq, m_sk,
                             D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                             HAS_M: tl.constexpr, DROP: tl.constexpr, IEEE: tl.constexpr):
    """Stores ``DK`` / ``DV`` ``[B, H, K, D]`` of one key block (``DELTA = rowsum(g * out)`` ``[B, H, Q]``)."""
    bh, b, h, d, dm = _program(heads, DP, D)
    cols, cm = _block(tl.program_id(0).to(tl.int64) * BN, nk, BN)
    k = _tile(K, bh * nk, cols, cm, d, dm, D, IEEE)
    v = _tile(V, bh * nk, cols, cm, d, dm, D, IEEE)
    dk = tl.zeros([BN, DP], tl.float32)
    dv = tl.zeros([BN, DP], tl.float32)
    for m0 in range(0, nq, BM):
        rows, rm = _block(m0, nq, BM)
        q, g, lse, delta = _query_block(Q, G, LSE, DELTA, bh, nq, rows, rm, d, dm, D, IEEE)
        pz, ds = _probs(q, k, g, v, lse, delta, M, b, h, bh, rows, cols, rm, cm, nq, total, offset, scale, p,
                        seed_lo, seed_hi, m_sb, m_sh, m_sq, m_sk, HAS_M, DROP, IEEE)
        dv += _dot(tl.trans(pz), g, IEEE)
        dk += _dot(tl.trans(ds), q, IEEE) * scale
    kv = (bh * nk + cols[:, None]) * D + d[None, :]
    tl.store(DK + kv, dk.to(DK.dtype.element_ty), mask=cm[:, None] & dm[None, :])
    tl.store(DV + kv, dv.to(DV.dtype.element_ty), mask=cm[:, None] & dm[None, :])


@triton.jit
def dense_backward_q_kernel(Q, K, V, G, LSE, DELTA, M, DQ, nq, nk, heads, total, offset, scale, p, seed_lo,
                            seed_hi, m_sb, m_sh, m_sq, m_sk,
                            D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            HAS_M: tl.constexpr, DROP: tl.constexpr, IEEE: tl.constexpr):
    """Stores ``DQ`` ``[B, H, Q, D]`` of one query block."""
    bh, b, h, d, dm = _program(heads, DP, D)
    rows, rm = _block(tl.program_id(0).to(tl.int64) * BM, nq, BM)
    q, g, lse, delta = _query_block(Q, G, LSE, DELTA, bh, nq, rows, rm, d, dm, D, IEEE)
    dq = tl.zeros([BM, DP], tl.float32)
    for n0 in range(0, nk, BN):
        cols, cm = _block(n0, nk, BN)
        k = _tile(K, bh * nk, cols, cm, d, dm, D, IEEE)
        v = _tile(V, bh * nk, cols, cm, d, dm, D, IEEE)
        pz, ds = _probs(q, k, g, v, lse, delta, M, b, h, bh, rows, cols, rm, cm, nq, total, offset, scale, p,
                        seed_lo, seed_hi, m_sb, m_sh, m_sq, m_sk, HAS_M, DROP, IEEE)
        dq += _dot(ds, k, IEEE) * scale
    qg = (bh * nq + rows[:, None]) * D + d[None, :]
    tl.store(DQ + qg, dq.to(DQ.dtype.element_ty), mask=rm[:, None] & dm[None, :])
