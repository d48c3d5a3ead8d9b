"""Triton kernels of the window correction of `sparse_bias.sparse_bias_attention` (the ``"triton"`` backend).

One program per (row, head) -- grid ``(B * Q, h)`` over a block of ``h`` heads starting at ``h0`` -- walks the row's
window entries in blocks, reading each window key's ``k`` / ``v`` row straight from the ``[B, H, K, D]`` tensors
through the CSR key indices (no gathered copies). Every load is converted to float32 and all arithmetic runs in
float32 registers. Per-entry operands are ``[h or 1, nnz]`` with a head stride (0 when shared by the heads),
per-row ones ``[h, B * Q]`` / ``[h, B * Q, D]``.

Forward, with ``p_e = exp(s_e - L)`` and ``a_e = p_e (e^{b_e} - 1)``: stores ``p`` ``[h, nnz]`` and adds the row's
``S = sum_e a_e``, removed mass ``R = sum_e max(0, -a_e)`` and ``C = sum_e a_e keep_e v_e`` into ``den``, ``rem``
``[h, B * Q]`` and ``out`` ``[h, B * Q, D]``. Backward: ``<g', v_e>``, the ``dq`` correction and the bias gradient in
one pass, the ``dk`` / ``dv`` corrections as atomic adds into float32 key rows.

Importing this module imports triton (`sparse_bias.backends.triton.correction` imports it on the first launch).
"""
import triton
import triton.language as tl

from .common_kernels import entry_block, window_row


@triton.jit
def correction_forward_kernel(Q, K, V, LSE, INDPTR, KEY, BV, EM, KP, P, DEN, REM, OUT,
                              nq, nk, h0, heads, scale,
                              lse_s, bv_s, em_s, kp_s, p_s, den_s, out_s, out_r,
                              D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, HAS_EM: tl.constexpr,
                              HAS_KP: tl.constexpr):
    """``LSE`` ``[h, B * Q]`` (the dense pass's); ``BV`` / ``EM`` / ``KP`` bias, additive mask and dropout
    multipliers ``[h or 1, nnz]``; writes ``P``, adds into ``DEN`` / ``REM`` (same strides) and ``OUT`` (its own
    strides: a view of the dense pass's output)."""
    r, i, b, bh, qk, start, end, d, dm = window_row(INDPTR, nq, heads, h0, D, DP)
    kv_base = bh * nk
    qrow = tl.load(Q + qk * D + d, mask=dm, other=0.0).to(tl.float32)
    lse = tl.load(LSE + i * lse_s + r)
    s_tot = tl.zeros([BLOCK], dtype=tl.float32)
    r_tot = tl.zeros([BLOCK], dtype=tl.float32)
    c_acc = tl.zeros([DP], dtype=tl.float32)
    for e0 in range(start, end, BLOCK):
        m, e, key, rows, mm = entry_block(KEY, e0, end, kv_base, d, dm, D, BLOCK)
        krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
        s = tl.sum(krows * qrow[None, :], axis=1) * scale
        if HAS_EM:
            s += tl.load(EM + i * em_s + e, mask=m, other=0.0)
        p = tl.where(m, tl.exp(s - lse), 0.0)
        tl.store(P + i * p_s + e, p, mask=m)
        a = p * (tl.exp(tl.load(BV + i * bv_s + e, mask=m, other=0.0)) - 1.0)
        s_tot += a
        r_tot += tl.maximum(-a, 0.0)                  # the removed mass R (sparse_bias._core.exact_rows)
        if HAS_KP:
            a = a * tl.load(KP + i * kp_s + e, mask=m, other=0.0)
        c_acc += tl.sum(a[:, None] * tl.load(V + rows, mask=mm, other=0.0).to(tl.float32), axis=0)
    tl.store(DEN + i * den_s + r, tl.load(DEN + i * den_s + r) + tl.sum(s_tot, axis=0))
    tl.store(REM + i * den_s + r, tl.load(REM + i * den_s + r) + tl.sum(r_tot, axis=0))
    optr = OUT + i * out_s + r * out_r + d
    tl.store(optr, tl.load(optr, mask=dm, other=0.0) + c_acc, mask=dm)


@triton.jit
def correction_backward_kernel(Q, K, V, GP, GO, INDPTR, KEY, P, BV, KP, DQ, DK, DV, DB,
                               nq, nk, h0, heads, dkv_heads, dkv_h0, scale,
                               go_s, p_s, bv_s, kp_s, dq_s, dq_r, db_s,
                               D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, HAS_KP: tl.constexpr):
    """``GP = g / (1 + S)`` ``[B, H, Q, D]``, ``GO = <g', o>`` ``[h, B * Q]``, ``P`` the forward's ``[h, nnz]``; adds
    into ``DQ`` ``[h, B * Q, D]`` and the float32 ``DK`` / ``DV`` ``[B, dkv_heads, K, D]`` (head ``dkv_h0 + i``);
    stores the bias gradient ``p_e e^{b_e} (keep_e <g', v_e> - <g', o>)`` into ``DB`` ``[h, nnz]``."""
    r, i, b, bh, qk, start, end, d, dm = window_row(INDPTR, nq, heads, h0, D, DP)
    kv_base = bh * nk
    dkv_base = (b * dkv_heads + dkv_h0 + i) * nk      # the gradients' (or the float32 scratch's) rows
    qrow = tl.load(Q + qk * D + d, mask=dm, other=0.0).to(tl.float32)
    grow = tl.load(GP + qk * D + d, mask=dm, other=0.0)
    go = tl.load(GO + i * go_s + r)
    dq_acc = tl.zeros([DP], dtype=tl.float32)
    for e0 in range(start, end, BLOCK):
        m, e, key, rows, mm = entry_block(KEY, e0, end, kv_base, d, dm, D, BLOCK)
        grows = (dkv_base + key)[:, None] * D + d[None, :]
        p = tl.load(P + i * p_s + e, mask=m, other=0.0)
        eb = tl.exp(tl.load(BV + i * bv_s + e, mask=m, other=0.0))
        a = p * (eb - 1.0)
        gv = tl.sum(tl.load(V + rows, mask=mm, other=0.0).to(tl.float32) * grow[None, :], axis=1)  # <g', v_e>
        ak = a
        if HAS_KP:
            keep = tl.load(KP + i * kp_s + e, mask=m, other=0.0)
            gv = gv * keep
            ak = a * keep
        diff = gv - go
        dd = a * diff
        krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
        dq_acc += tl.sum(dd[:, None] * krows, axis=0) * scale
        tl.atomic_add(DK + grows, (dd * scale)[:, None] * qrow[None, :], mask=mm)
        tl.atomic_add(DV + grows, ak[:, None] * grow[None, :], mask=mm)
        tl.store(DB + i * db_s + e, p * eb * diff, mask=m)      # e^b, not 1 + (e^b - 1)
    dptr = DQ + i * dq_s + r * dq_r + d
    tl.store(dptr, tl.load(dptr, mask=dm, other=0.0) + dq_acc, mask=dm)
