"""Flash-style dense attention with the counter-hash attention dropout, as Triton kernels (the GPU dense pass
when ``dropout_p > 0``).

PyTorch's CUDA attention kernels draw their dropout from philox streams whose layout is private; the exact
correction needs the *same* keep decision for a score in the dense pass, the window terms and the backward,
which the counter-hash of `sparse_bias.dense.dropout.dropout_keep` gives as a pure function of the score's
flat index. So instead of reproducing the CUDA kernels' decisions, the dense pass with dropout runs these
kernels: online softmax over key blocks with the keep decision hashed in registers inside the block loop
(never stored), float32 accumulation for float16 / bfloat16 / float32 inputs, and the log-sum-exp of the
undropped scores. The backward is two race-free passes (``dk`` / ``dv`` per key block, ``dq`` per query
block), recomputing probabilities and decisions. Offsets are int64.

Runs on CUDA tensors, and on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``), which is how
the tests check it without a GPU.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Tuple

import torch

from .._core.call import Call
from .dropout import seed_keys

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None

_KERNELS = {}
BLOCK_M = 32
BLOCK_N = 32


def _kernels():
    """Compile-on-first-use (Triton is a heavy import)."""
    global triton, tl, _hash, _keep, _scores, _probs, _tile, _dot  # module globals: jitted functions resolve names through them
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _hash(x):
        x = ((x >> 16) ^ x) * 0x45D9F3B
        x = ((x >> 16) ^ x) * 0x45D9F3B
        return (x >> 16) ^ x

    @triton.jit
    def _keep(flat, seed_lo, seed_hi, p):
        """The keep decision of `sparse_bias.dense.dropout.dropout_keep` for int64 flat indices (``seed_lo`` /
        ``seed_hi``: the seed's keys, `sparse_bias.dense.dropout.seed_keys`)."""
        lo = (flat & 0xFFFFFFFF).to(tl.uint32)
        hi = (flat >> 32).to(tl.uint32)
        h = _hash(_hash(lo ^ seed_lo.to(tl.uint32)) ^ hi ^ seed_hi.to(tl.uint32))
        return (h & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216.0) >= p

    @triton.jit
    def _tile(PTR, base, idx, ok, d, dm, D: tl.constexpr, IEEE: tl.constexpr):
        """Rows ``idx`` (masked by ``ok``) of a ``[.., N, D]`` tensor starting at row ``base``; float32 with IEEE."""
        t = tl.load(PTR + (base + idx[:, None]) * D + d[None, :], mask=ok[:, None] & dm[None, :], other=0.0)
        if IEEE:
            t = t.to(tl.float32)
        return t

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        """``a @ b`` with float32 accumulation: IEEE float32 (no TF32), or ``a`` cast to ``b``'s half dtype."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a.to(b.dtype), b)

    @triton.jit
    def _scores(q, k, M, b, h, rows, cols, rm, cm, scale, m_sb, m_sh, m_sq, m_sk, HAS_M: tl.constexpr,
                IEEE: tl.constexpr):
        """scale q k^T + mask of one block, -inf outside the key range."""
        s = _dot(q, tl.trans(k), IEEE) * scale
        if HAS_M:
            s += tl.load(M + b * m_sb + h * m_sh + rows[:, None] * m_sq + cols[None, :] * m_sk,
                         mask=rm[:, None] & cm[None, :], other=0.0)
        return tl.where(cm[None, :], s, float("-inf"))

    @triton.jit
    def _fwd(Q, K, V, M, OUT, LSE, nq, nk, heads, total, offset, scale, p, seed_lo, seed_hi,
             m_sb, m_sh, m_sq, m_sk,
             D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr,
             DROP: tl.constexpr, IEEE: tl.constexpr):
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // heads, bh % heads
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        rm = rows < nq
        d = tl.arange(0, DP)
        dm = d < D
        q = _tile(Q, bh * nq, rows, rm, d, dm, D, IEEE)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        acc = tl.zeros([BM, DP], tl.float32)
        inv = 1.0 / (1.0 - p)
        for n0 in range(0, nk, BN):
            cols = n0 + tl.arange(0, BN)
            cm = cols < nk
            k = _tile(K, bh * nk, cols, cm, d, dm, D, IEEE)
            s = _scores(q, k, M, b, h, rows, cols, rm, cm, scale, m_sb, m_sh, m_sq, m_sk, HAS_M, IEEE)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # rows masked so far: add nothing
            alpha = tl.exp(m_i - m_safe)
            pe = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(pe, 1)
            if DROP:
                flat = ((bh * nq + rows) * total)[:, None] + offset + cols[None, :]
                pe = tl.where(_keep(flat, seed_lo, seed_hi, p), pe * inv, 0.0)
            acc = acc * alpha[:, None] + _dot(pe, _tile(V, bh * nk, cols, cm, d, dm, D, IEEE), IEEE)
            m_i = m_new
        out = tl.where(l_i[:, None] == 0, 0.0, acc / l_i[:, None])      # a fully masked row: zeros
        tl.store(OUT + (bh * nq + rows[:, None]) * D + d[None, :], out.to(OUT.dtype.element_ty),
                 mask=rm[:, None] & dm[None, :])
        tl.store(LSE + bh * nq + rows, m_i + tl.log(l_i), mask=rm)

    @triton.jit
    def _probs(q, k, g, v, lse, delta, M, b, h, bh, rows, cols, rm, cm, nq, total, offset, scale, p, seed_lo,
               seed_hi, m_sb, m_sh, m_sq, m_sk, HAS_M: tl.constexpr, DROP: tl.constexpr, IEEE: tl.constexpr):
        """(p * keep, ds) of one block of the backward."""
        s = _scores(q, k, M, b, h, rows, cols, rm, cm, scale, m_sb, m_sh, m_sq, m_sk, HAS_M, IEEE)
        pr = tl.where(rm[:, None] & cm[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(g, tl.trans(v), IEEE)
        if DROP:
            flat = ((bh * nq + rows) * total)[:, None] + offset + cols[None, :]
            z = tl.where(_keep(flat, seed_lo, seed_hi, p), 1.0 / (1.0 - p), 0.0)
            return pr * z, pr * (dp * z - delta[:, None])
        return pr, pr * (dp - delta[:, None])

    @triton.jit
    def _bwd_kv(Q, K, V, G, LSE, DELTA, M, DK, DV, nq, nk, heads, total, offset, scale, p, seed_lo, seed_hi,
                m_sb, m_sh, m_sq, m_sk,
                D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr,
                DROP: tl.constexpr, IEEE: tl.constexpr):
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // heads, bh % heads
        cols = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        cm = cols < nk
        d = tl.arange(0, DP)
        dm = d < D
        k = _tile(K, bh * nk, cols, cm, d, dm, D, IEEE)
        v = _tile(V, bh * nk, cols, cm, d, dm, D, IEEE)
        dk = tl.zeros([BN, DP], tl.float32)
        dv = tl.zeros([BN, DP], tl.float32)
        for m0 in range(0, nq, BM):
            rows = m0 + tl.arange(0, BM)
            rm = rows < nq
            q = _tile(Q, bh * nq, rows, rm, d, dm, D, IEEE)
            g = _tile(G, bh * nq, rows, rm, d, dm, D, IEEE)
            lse = tl.load(LSE + bh * nq + rows, mask=rm, other=0.0)
            delta = tl.load(DELTA + bh * nq + rows, mask=rm, other=0.0)
            pz, ds = _probs(q, k, g, v, lse, delta, M, b, h, bh, rows, cols, rm, cm, nq, total, offset, scale, p,
                            seed_lo, seed_hi, m_sb, m_sh, m_sq, m_sk, HAS_M, DROP, IEEE)
            dv += _dot(tl.trans(pz), g, IEEE)
            dk += _dot(tl.trans(ds), q, IEEE) * scale
        kv = (bh * nk + cols[:, None]) * D + d[None, :]
        tl.store(DK + kv, dk.to(DK.dtype.element_ty), mask=cm[:, None] & dm[None, :])
        tl.store(DV + kv, dv.to(DV.dtype.element_ty), mask=cm[:, None] & dm[None, :])

    @triton.jit
    def _bwd_q(Q, K, V, G, LSE, DELTA, M, DQ, nq, nk, heads, total, offset, scale, p, seed_lo, seed_hi,
               m_sb, m_sh, m_sq, m_sk,
               D: tl.constexpr, DP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, HAS_M: tl.constexpr,
               DROP: tl.constexpr, IEEE: tl.constexpr):
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // heads, bh % heads
        rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
        rm = rows < nq
        d = tl.arange(0, DP)
        dm = d < D
        q = _tile(Q, bh * nq, rows, rm, d, dm, D, IEEE)
        g = _tile(G, bh * nq, rows, rm, d, dm, D, IEEE)
        lse = tl.load(LSE + bh * nq + rows, mask=rm, other=0.0)
        delta = tl.load(DELTA + bh * nq + rows, mask=rm, other=0.0)
        dq = tl.zeros([BM, DP], tl.float32)
        for n0 in range(0, nk, BN):
            cols = n0 + tl.arange(0, BN)
            cm = cols < nk
            k = _tile(K, bh * nk, cols, cm, d, dm, D, IEEE)
            v = _tile(V, bh * nk, cols, cm, d, dm, D, IEEE)
            pz, ds = _probs(q, k, g, v, lse, delta, M, b, h, bh, rows, cols, rm, cm, nq, total, offset, scale, p,
                            seed_lo, seed_hi, m_sb, m_sh, m_sq, m_sk, HAS_M, DROP, IEEE)
            dq += _dot(ds, k, IEEE) * scale
        qg = (bh * nq + rows[:, None]) * D + d[None, :]
        tl.store(DQ + qg, dq.to(DQ.dtype.element_ty), mask=rm[:, None] & dm[None, :])

    _KERNELS.update(fwd=_fwd, bwd_kv=_bwd_kv, bwd_q=_bwd_q, next_power_of_2=triton.next_power_of_2,
                    cdiv=triton.cdiv)
    return _KERNELS


def _float32_dots(q) -> bool:
    """Whether the kernels convert tiles to float32 and multiply them in IEEE float32: for float32 inputs (no
    TF32), and for bfloat16 under the Triton interpreter, whose ``tl.dot`` gives wrong results on bfloat16
    tiles (numpy has no bfloat16), so there the kernels are tested with loads cast from bfloat16. On a GPU,
    float16 / bfloat16 tiles go to ``tl.dot`` as they are, with float32 accumulation."""
    return q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def call_args(k, call: Call):
    """``(mask, kwargs)``: what every Triton attention kernel of the library takes from a call -- the additive mask
    in float32 (or None) with its strides (0 on broadcast dims), the key range, scale, dropout and seed keys."""
    mask = call.mask
    strides = [0, 0, 0, 0]
    if mask is not None:
        mask = mask.to(torch.float32)
        strides = [mask.stride(i) if mask.shape[i] > 1 else 0 for i in range(4)]
    offset, total = call.key_range or (0, k.shape[2])
    seed_lo, seed_hi = seed_keys(call.seed)
    return mask, dict(total=total, offset=offset, scale=float(call.scale), p=float(call.dropout_p), seed_lo=seed_lo,
                      seed_hi=seed_hi, m_sb=strides[0], m_sh=strides[1], m_sq=strides[2], m_sk=strides[3],
                      HAS_M=mask is not None, DROP=call.dropout_p > 0)


def _common(q, k, call: Call):
    bsz, heads, nq, dim = q.shape
    mask, args = call_args(k, call)
    return mask, dict(args, nq=nq, nk=k.shape[2], heads=heads, D=dim, DP=max(16, _kernels()["next_power_of_2"](dim)),
                      BM=BLOCK_M, BN=BLOCK_N, IEEE=_float32_dots(q))


def dense_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Call) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, H, Q, D] in q's dtype, lse [B, H, Q] float32)`` of ``softmax(scale q k^T + mask) v`` with the
    counter-hash dropout of `sparse_bias.dense.dropout` (the call's scale, mask, dropout, seed and key range).
    q, k, v: float32 / float16 / bfloat16, one device."""
    q, k, v = (t.contiguous() for t in (q, k, v))
    mask, args = _common(q, k, call)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    ker = _kernels()
    grid = (ker["cdiv"](q.shape[2], BLOCK_M), q.shape[0] * q.shape[1])
    ker["fwd"][grid](q, k, v, mask if mask is not None else lse, out, lse, **args)
    return out, lse


def dense_backward(grad_out, inputs, outputs, call: Call) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of `dense_forward`; ``inputs = (q, k, v)``, ``outputs = (out, lse)`` -- ``out`` may be any
    output tensor (it enters only through ``rowsum(grad_out * out)``)."""
    q, k, v, g = (t.contiguous() for t in tuple(inputs) + (grad_out.to(inputs[0].dtype),))
    out, lse = outputs
    delta = (g.float() * out.float()).sum(-1).contiguous()
    lse = lse.float().contiguous()
    mask, args = _common(q, k, call)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    ker = _kernels()
    m = mask if mask is not None else lse
    bh = q.shape[0] * q.shape[1]
    ker["bwd_kv"][(ker["cdiv"](k.shape[2], BLOCK_N), bh)](q, k, v, g, lse, delta, m, dk, dv, **args)
    ker["bwd_q"][(ker["cdiv"](q.shape[2], BLOCK_M), bh)](q, k, v, g, lse, delta, m, dq, **args)
    return dq, dk, dv
