"""The dense pass in pure PyTorch: blocks of queries so that memory stays bounded, with the counter-hash dropout.

The fallback of every other dense kernel, and the reference the GPU kernels are checked against before first use.
"""
from __future__ import annotations

import torch

from .._core.call import Call
from .dropout import dropout_scale

__all__ = ["chunked_forward", "chunked_backward", "CHUNK_SCORES"]

#: Scores per block (``heads * queries * keys``).
CHUNK_SCORES = 1 << 22


def _blocks(q: torch.Tensor, k: torch.Tensor):
    """(b, h-slice, q-slice) blocks of at most CHUNK_SCORES scores."""
    bsz, heads, nq, _ = q.shape
    nk = max(k.shape[2], 1)
    rows = max(1, CHUNK_SCORES // nk)
    h_step = max(1, min(heads, rows // max(nq, 1))) if rows >= nq else 1
    q_step = nq if rows >= nq else rows
    for b in range(bsz):
        for h0 in range(0, heads, h_step):
            for q0 in range(0, nq, max(q_step, 1)):
                yield b, slice(h0, min(h0 + h_step, heads)), slice(q0, min(q0 + q_step, nq))


def _block_mask(mask, b, hs, qs):
    """The ``[h, q, K]`` block of a 4-D mask broadcastable to ``[B, H, Q, K]`` (size-1 dims kept)."""
    if mask is None:
        return None
    return mask[b if mask.shape[0] > 1 else 0, hs if mask.shape[1] > 1 else slice(0, 1),
                qs if mask.shape[2] > 1 else slice(0, 1)]


def _block_scores(call: Call, qb, kb, b, hs, qs):
    s = torch.matmul(qb, kb.transpose(-1, -2)) * call.scale
    m = _block_mask(call.mask, b, hs, qs)
    return s if m is None else s + m.to(s.dtype)


def _block_keep(call: Call, shape, b, hs, qs, device):
    """Dropout multipliers of the ``[h, q, K]`` block of batch element ``b``."""
    _, heads, nq, nk = shape
    offset, total = call.key_range or (0, nk)
    index = (b, torch.arange(hs.start, hs.stop, device=device).view(-1, 1, 1),
             torch.arange(qs.start, qs.stop, device=device).view(1, -1, 1),
             torch.arange(offset, offset + nk, device=device))
    return dropout_scale(call.seed, call.dropout_p, index, (None, heads, nq, total), call.cdt)


def chunked_forward(q, k, v, call: Call):
    """``(out [B, H, Q, D] in q's dtype, lse [B, H, Q] in the compute dtype)``; a fully masked row: 0 and -inf."""
    cdt = call.cdt
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=cdt, device=q.device)
    shape = q.shape[:3] + (k.shape[2],)
    for b, hs, qs in _blocks(q, k):
        s = _block_scores(call, q[b, hs, qs].to(cdt), k[b, hs].to(cdt), b, hs, qs)
        # normalised by the row sum itself, as flash kernels are: exp(s - lse) would carry lse's rounding
        # (eps * |lse|) into every probability, and through <g, o> into the gradients of concentrated rows
        top = s.amax(-1, keepdim=True)
        e = torch.exp(s - top.masked_fill(top == float("-inf"), 0.0))          # fully masked rows: e = 0
        total = e.sum(-1, keepdim=True)
        if call.dropout_p > 0:
            e = e * _block_keep(call, shape, b, hs, qs, q.device)
        o = torch.matmul(e, v[b, hs].to(cdt)) / total.masked_fill(total == 0, 1.0)
        out[b, hs, qs] = o.to(q.dtype)
        lse[b, hs, qs] = (top + torch.log(total)).squeeze(-1)                  # fully masked rows: -inf
    return out, lse


def chunked_backward(grad_out, q, k, v, out, lse, call: Call):
    """``(dq, dk, dv)``; ``out`` may be any output (it enters through ``rowsum(grad_out * out)``), ``lse`` is
    taken as `kernel_lse` gives it (``+inf`` on fully masked rows)."""
    cdt = call.cdt
    dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
    dk = torch.zeros(k.shape, dtype=cdt, device=q.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=q.device)
    delta = (grad_out.to(cdt) * out.to(cdt)).sum(-1)                       # D = rowsum(g * out)
    shape = q.shape[:3] + (k.shape[2],)
    for b, hs, qs in _blocks(q, k):
        qb, kb, vb, gb = (t.to(cdt) for t in (q[b, hs, qs], k[b, hs], v[b, hs], grad_out[b, hs, qs]))
        p = torch.exp(_block_scores(call, qb, kb, b, hs, qs) - lse[b, hs, qs].to(cdt).unsqueeze(-1))
        dp = torch.matmul(gb, vb.transpose(-1, -2))
        pv = p
        if call.dropout_p > 0:
            keep = _block_keep(call, shape, b, hs, qs, q.device)
            dp = dp * keep
            pv = p * keep
        ds = p * (dp - delta[b, hs, qs].unsqueeze(-1))
        dq[b, hs, qs] += torch.matmul(ds, kb) * call.scale
        dk[b, hs] += torch.matmul(ds.transpose(-1, -2), qb) * call.scale
        dv[b, hs] += torch.matmul(pv.transpose(-1, -2), gb)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
