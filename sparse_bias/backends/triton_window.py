"""Fused Triton kernels for *window attention*: attention restricted to each query's window keys.

Layout (global CSR over all batch elements). Row ``r = b * Q + q`` (``b`` in ``[0, B)``, ``q`` in ``[0, Q)``)
owns the window entries ``e`` in ``[indptr[r], indptr[r + 1])``; entry ``e`` names the key ``key[e]`` in
``[0, K)``. A launch covers a block of ``h`` consecutive heads ``h0 .. h0 + h - 1`` of the ``H`` heads of
``q`` / ``k`` / ``v`` (``[B, H, Q|K, D]``); head ``i`` of the block is absolute head ``h0 + i``. Per-entry
operands are ``[h or 1, nnz]`` (a first dimension of 1: shared by all heads, read with a head stride of 0)
and per-row results are ``[h, B * Q]`` / ``[h, B * Q, D]``.

Forward, for head ``i`` and row ``r`` (``b, q = divmod(r, Q)``, ``hh = h0 + i``)::

    s_e      = scale * <q[b, hh, q], k[b, hh, key[e]]> + bvals[i, e] + emask[i, e]
    lse[i,r] = log(sum_{e in row r} exp(s_e))          (-inf for an empty or fully masked row)
    p_e      = exp(s_e - lse[i, r])                    (0 when lse[i, r] is -inf)
    out[i,r] = sum_e p_e * keep[i, e] * v[b, hh, key[e]]

``keep`` holds dropout multipliers (``0`` or ``1 / (1 - p)``; all ones when absent). One program per
(row, head) walks the row's entries in blocks of ``BLOCK`` with an online softmax (running max and sum,
rescaled per block); masked (``-inf``) scores and empty rows produce ``p = 0``, ``out = 0`` and
``lse = -inf`` without NaNs.

Backward, with ``go[i, r] = <g[b, hh, q], out[i, r]>`` given by the caller and
``gv_e = <g[b, hh, q], v[b, hh, key[e]]>``::

    ds_e            = p_e * (keep_e * gv_e - go[i, r])        (= dL/ds_e = dL/dbvals[i, e], stored in db)
    dq[i, r]       += scale * sum_e ds_e * k[b, hh, key[e]]
    dk[b, hh, key] += scale * ds_e * q[b, hh, q]              (atomic adds: keys are shared between rows)
    dv[b, hh, key] += p_e * keep_e * g[b, hh, q]

The same program recomputes ``p_e`` from the forward's ``lse``. Every load is converted to float32 and all
arithmetic runs in float32 registers, whatever the input dtype (float32, float16 or bfloat16). The ``dk`` /
``dv`` terms of float32 inputs are added atomically straight into the gradients; those of half-precision
inputs go into a float32 scratch ``[B, h, K, D]`` that is cast and added once at the end. All offsets are
int64 (program ids are cast before any multiplication), so ``B*H*K*D`` or ``h*nnz`` beyond 2^31 address
correctly. The head dimension ``D`` is a runtime size, padded to the next power of two ``DP`` with a mask.

The launch functions never synchronise with the device (no ``.item()``: the grid ``(B * Q, h)`` comes from
sizes). Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, set
before triton is imported), which is how the tests check it without a GPU.
"""
from __future__ import annotations

import importlib.util

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

BLOCK = 32
_KERNELS: dict = {}


def _kernels():
    """Compile-on-first-use: Triton is imported only when a kernel is launched (it is a heavy import)."""
    global triton, tl, _win_entries, _win_scores  # module globals: jitted functions resolve names through them
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _win_entries(KEY, e0, end, kv_base, d, dm, D, BLOCK: tl.constexpr):
        """A block of window entries starting at ``e0``: validity, global entry index (int64), key (int64), the
        offsets of the entries' k / v rows and the 2-D load mask."""
        e = e0 + tl.arange(0, BLOCK).to(tl.int64)
        m = e < end
        key = tl.load(KEY + e, mask=m, other=0).to(tl.int64)
        return m, e, key, (kv_base + key)[:, None] * D + d[None, :], m[:, None] & dm[None, :]

    @triton.jit
    def _win_scores(qrow, krows, m, e, i, BV, EM, bv_s, em_s, scale, HAS_BIAS: tl.constexpr,
                    HAS_EMASK: tl.constexpr):
        """``scale * <q, k_e> + bvals + emask`` of a block of entries; -inf outside the row."""
        s = tl.sum(krows * qrow[None, :], axis=1) * scale
        if HAS_BIAS:
            s += tl.load(BV + i * bv_s + e, mask=m, other=0.0).to(tl.float32)
        if HAS_EMASK:
            s += tl.load(EM + i * em_s + e, mask=m, other=0.0).to(tl.float32)
        return tl.where(m, s, float("-inf"))

    @triton.jit
    def _fwd_kernel(Q, K, V, INDPTR, KEY, BV, EM, KP, OUT, LSE,
                    nq, nk, heads, h0, D, scale,
                    bv_s, em_s, kp_s, out_s, out_r, lse_s,
                    DP: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EMASK: tl.constexpr,
                    HAS_KEEP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)          # global row b * Q + q
        i = tl.program_id(1).to(tl.int64)          # head within the block
        b = r // nq
        bh = b * heads + h0 + i                    # int64 (r and i are): offsets below cannot overflow
        kv_base = bh * nk
        start = tl.load(INDPTR + r).to(tl.int64)
        end = tl.load(INDPTR + r + 1).to(tl.int64)
        d = tl.arange(0, DP)
        dm = d < D
        qrow = tl.load(Q + (bh * nq + (r - b * nq)) * D + d, mask=dm, other=0.0).to(tl.float32)
        m_i = tl.full([], float("-inf"), tl.float32)   # running max
        l_i = tl.zeros([], dtype=tl.float32)            # running sum of exp(s - m_i)
        acc = tl.zeros([DP], dtype=tl.float32)          # running sum of exp(s - m_i) * keep * v
        for e0 in range(start, end, BLOCK):
            m, e, key, rows, mm = _win_entries(KEY, e0, end, kv_base, d, dm, D, BLOCK)
            krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
            s = _win_scores(qrow, krows, m, e, i, BV, EM, bv_s, em_s, scale, HAS_BIAS, HAS_EMASK)
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
        live = l_i > 0.0                                 # empty or fully masked rows: lse = -inf, out = 0
        tl.store(LSE + i * lse_s + r, tl.where(live, m_i + tl.log(tl.where(live, l_i, 1.0)), float("-inf")))
        out = tl.where(live, acc / tl.where(live, l_i, 1.0), 0.0)
        tl.store(OUT + i * out_s + r * out_r + d, out, mask=dm)

    @triton.jit
    def _bwd_kernel(Q, K, V, G, GO, LSE, INDPTR, KEY, BV, EM, KP, DQ, DK, DV, DB,
                    nq, nk, heads, h0, D, dkv_heads, dkv_h0, scale,
                    bv_s, em_s, kp_s, go_s, lse_s, dq_s, dq_r, db_s,
                    DP: tl.constexpr, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_EMASK: tl.constexpr,
                    HAS_KEEP: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1).to(tl.int64)
        b = r // nq
        bh = b * heads + h0 + i
        qk = bh * nq + (r - b * nq)
        kv_base = bh * nk
        dkv_base = (b * dkv_heads + dkv_h0 + i) * nk   # this head's rows in dk / dv (or in the float32 scratch)
        start = tl.load(INDPTR + r).to(tl.int64)
        end = tl.load(INDPTR + r + 1).to(tl.int64)
        d = tl.arange(0, DP)
        dm = d < D
        qrow = tl.load(Q + qk * D + d, mask=dm, other=0.0).to(tl.float32)
        grow = tl.load(G + qk * D + d, mask=dm, other=0.0).to(tl.float32)
        go = tl.load(GO + i * go_s + r).to(tl.float32)
        lse = tl.load(LSE + i * lse_s + r).to(tl.float32)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)   # a dead row: exp(s - inf) = 0, no NaN
        dq_acc = tl.zeros([DP], dtype=tl.float32)
        for e0 in range(start, end, BLOCK):
            m, e, key, rows, mm = _win_entries(KEY, e0, end, kv_base, d, dm, D, BLOCK)
            krows = tl.load(K + rows, mask=mm, other=0.0).to(tl.float32)
            s = _win_scores(qrow, krows, m, e, i, BV, EM, bv_s, em_s, scale, HAS_BIAS, HAS_EMASK)
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

    _KERNELS.update(fwd=_fwd_kernel, bwd=_bwd_kernel, next_power_of_2=triton.next_power_of_2)
    return _KERNELS


def _entry_rows(t, name, h, nnz):
    """A ``[h or 1, nnz]`` per-entry operand: the tensor with a unit last stride and its head stride (0 when
    shared by all heads); ``(None, 0)`` when absent."""
    if t is None:
        return None, 0
    if t.dim() != 2 or t.shape[0] not in (1, h) or t.shape[1] != nnz:
        raise ValueError(f"{name} must be [h or 1, nnz] = [{h} or 1, {nnz}], got shape {tuple(t.shape)}")
    t = t if t.stride(-1) == 1 else t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else 0)


def _unit_last(t, name):
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit last stride (it is written in place)")


def _common(q, k, v, indptr, key, h0, h):
    """Shared checks (sizes and strides only: no device synchronisation) and the launch's size arguments."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, H, Q, D] and k, v [B, H, K, D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    nb, heads, nq, dim = q.shape
    if k.shape[0] != nb or k.shape[1] != heads or k.shape[3] != dim:
        raise ValueError(f"k / v {tuple(k.shape)} do not match q {tuple(q.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("q, k, v must be contiguous")
    if indptr.numel() != nb * nq + 1:
        raise ValueError(f"indptr must have B * Q + 1 = {nb * nq + 1} entries, got {indptr.numel()}")
    if not (0 <= h0 and h0 + h <= heads):
        raise ValueError(f"head block [{h0}, {h0 + h}) is outside the {heads} heads")
    return nb, heads, nq, k.shape[2], dim


def window_forward(q, k, v, indptr, key, bvals, emask, keep, scale: float, h0: int, out, lse) -> None:
    """Window attention forward for the head block ``h0 .. h0 + h - 1`` (``h = out.shape[0]``).

    Args:
        q: ``[B, H, Q, D]``; k, v: ``[B, H, K, D]``. Contiguous, all float32, float16 or bfloat16.
        indptr: int64 ``[B * Q + 1]``, the CSR row pointer of the global rows ``r = b * Q + q``.
        key: int64 ``[nnz]``, the key index in ``[0, K)`` of each window entry.
        bvals, emask: ``None`` or float32 ``[h or 1, nnz]`` added to the scores (a first dim of 1: shared by
            all heads). ``emask`` typically holds 0 / -inf.
        keep: ``None`` or float32 ``[h, nnz]`` dropout multipliers applied to ``p`` in the output.
        scale: the score scale. h0: the block's first head.
        out: float32 ``[h, B * Q, D]``, any strides with ``stride(-1) == 1``; overwritten with the output.
        lse: float32 ``[h, B * Q]`` with ``stride(-1) == 1``; overwritten with the window log-sum-exp
            (-inf for empty or fully masked rows, whose output is 0).
    """
    h = out.shape[0]
    nb, heads, nq, nk, dim = _common(q, k, v, indptr, key, h0, h)
    if tuple(out.shape) != (h, nb * nq, dim) or tuple(lse.shape) != (h, nb * nq):
        raise ValueError(f"out must be [h, B*Q, D] = {(h, nb * nq, dim)} and lse [h, B*Q], got "
                         f"{tuple(out.shape)}, {tuple(lse.shape)}")
    _unit_last(out, "out")
    _unit_last(lse, "lse")
    if h == 0 or nb * nq == 0:
        return
    nnz = key.numel()
    if nnz == 0:                                 # no window anywhere: nothing to launch
        lse.fill_(float("-inf"))
        out.zero_()
        return
    (bv, bv_s), (em, em_s), (kp, kp_s) = (_entry_rows(t, name, h, nnz) for t, name in
                                          ((bvals, "bvals"), (emask, "emask"), (keep, "keep")))
    ker = _kernels()
    grid = (nb * nq, h)
    ker["fwd"][grid](q, k, v, indptr, key, bv if bv is not None else lse, em if em is not None else lse,
                     kp if kp is not None else lse, out, lse,
                     nq, nk, heads, h0, dim, float(scale),
                     bv_s, em_s, kp_s, out.stride(0), out.stride(1), lse.stride(0),
                     DP=ker["next_power_of_2"](max(dim, 1)), BLOCK=BLOCK, HAS_BIAS=bv is not None,
                     HAS_EMASK=em is not None, HAS_KEEP=kp is not None)


def window_backward(q, k, v, indptr, key, bvals, emask, keep, scale: float, h0: int, g, go, lse, dq, dk, dv,
                    db) -> None:
    """Window attention backward for the head block ``h0 .. h0 + h - 1`` (``h = lse.shape[0]``).

    Args:
        q, k, v, indptr, key, bvals, emask, keep, scale, h0: as in `window_forward`.
        g: float32 ``[B, H, Q, D]``, contiguous: the output gradient (heads ``h0 .. h0 + h - 1`` are read).
        go: float32 ``[h, B * Q]`` (unit last stride): ``<g[b, h0 + i, q], out[i, r]>``.
        lse: float32 ``[h, B * Q]``: the forward's log-sum-exp.
        dq: float32 ``[h, B * Q, D]``, any strides with ``stride(-1) == 1``; the q gradient is ADDED into it.
        dk, dv: ``[B, H, K, D]``, contiguous, in the inputs' dtype; the k / v gradients of the block's heads are
            ADDED into them (float32: atomically in place; float16 / bfloat16: through a float32 scratch
            ``[B, h, K, D]`` cast and added once).
        db: float32 ``[h, nnz]`` (unit last stride): STORES the score gradient ``ds_e`` of every entry, which
            is the gradient of per-head bias values (a shared-bias caller sums it over the heads).
    """
    h = lse.shape[0]
    nb, heads, nq, nk, dim = _common(q, k, v, indptr, key, h0, h)
    nnz = key.numel()
    if tuple(dq.shape) != (h, nb * nq, dim) or tuple(go.shape) != (h, nb * nq) or tuple(db.shape) != (h, nnz):
        raise ValueError(f"dq must be [h, B*Q, D] = {(h, nb * nq, dim)}, go [h, B*Q] and db [h, nnz]; got "
                         f"{tuple(dq.shape)}, {tuple(go.shape)}, {tuple(db.shape)}")
    if tuple(g.shape) != tuple(q.shape) or not g.is_contiguous():
        raise ValueError(f"g must be a contiguous {tuple(q.shape)} tensor")
    if dk.shape != k.shape or dv.shape != k.shape or not (dk.is_contiguous() and dv.is_contiguous()):
        raise ValueError("dk and dv must be contiguous [B, H, K, D] tensors")
    for t, name in ((dq, "dq"), (db, "db"), (go, "go"), (lse, "lse")):
        _unit_last(t, name)
    if h == 0 or nb * nq == 0 or nnz == 0:
        return
    (bv, bv_s), (em, em_s), (kp, kp_s) = (_entry_rows(t, name, h, nnz) for t, name in
                                          ((bvals, "bvals"), (emask, "emask"), (keep, "keep")))
    direct = dk.dtype == torch.float32 and dv.dtype == torch.float32
    if direct:                                   # atomic adds straight into the float32 gradients
        gk, gv, dkv_heads, dkv_h0 = dk, dv, heads, h0
    else:                                        # half precision: a float32 scratch of the block's heads
        gk, gv = (torch.zeros((nb, h, nk, dim), dtype=torch.float32, device=dk.device) for _ in range(2))
        dkv_heads, dkv_h0 = h, 0
    ker = _kernels()
    grid = (nb * nq, h)
    ker["bwd"][grid](q, k, v, g, go, lse, indptr, key, bv if bv is not None else lse,
                     em if em is not None else lse, kp if kp is not None else lse, dq, gk, gv, db,
                     nq, nk, heads, h0, dim, dkv_heads, dkv_h0, float(scale),
                     bv_s, em_s, kp_s, go.stride(0), lse.stride(0), dq.stride(0), dq.stride(1), db.stride(0),
                     DP=ker["next_power_of_2"](max(dim, 1)), BLOCK=BLOCK, HAS_BIAS=bv is not None,
                     HAS_EMASK=em is not None, HAS_KEEP=kp is not None)
    if not direct:
        dk[:, h0:h0 + h] += gk.to(dk.dtype)
        dv[:, h0:h0 + h] += gv.to(dv.dtype)
