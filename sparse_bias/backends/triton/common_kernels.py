"""Triton helpers shared by the kernels of this package: a block of window entries, a program's window row, the
counter-hash dropout decision.

Importing this module imports triton; `sparse_bias.backends.triton` imports the kernel modules only when a kernel
launches (and only when `sparse_bias.backends.triton.TRITON_AVAILABLE`).

Window layout (global CSR over all batch elements): row ``r = b * Q + q`` owns the entries ``e`` in
``[indptr[r], indptr[r + 1])``; entry ``e`` names the key ``key[e]`` in ``[0, K)``; ``q`` / ``k`` / ``v`` are
contiguous ``[B, H, Q|K, D]``. Offsets are int64.
"""
import triton
import triton.language as tl


@triton.jit
def window_row(INDPTR, nq, heads, h0, D, DP: tl.constexpr):
    """The row and head of this program (grid ``(B * Q, h)``, head ``i`` of a block starting at head ``h0``):
    ``(r, i, b, bh, qk, start, end, d, dm)`` -- the global row, the head in the block, the batch element, the
    ``[B, H]`` slot ``b * H + h0 + i``, the row of ``q`` ``[B * H * Q]``, the row's entry range, the feature
    offsets ``[DP]`` and their mask ``d < D``. Everything int64 (program ids are cast before any product)."""
    r = tl.program_id(0).to(tl.int64)          # global row b * Q + q
    i = tl.program_id(1).to(tl.int64)          # head within the block
    b = r // nq
    bh = b * heads + h0 + i
    start = tl.load(INDPTR + r).to(tl.int64)
    end = tl.load(INDPTR + r + 1).to(tl.int64)
    d = tl.arange(0, DP)
    return r, i, b, bh, bh * nq + (r - b * nq), start, end, d, d < D


@triton.jit
def entry_block(KEY, e0, end, kv_base, d, dm, D, BLOCK: tl.constexpr):
    """The block of window entries starting at ``e0``: ``(valid [BLOCK], entry index (int64), key (int64), the
    offsets of the entries' k / v rows [BLOCK, DP] from row ``kv_base``, the 2-D load mask)``."""
    e = e0 + tl.arange(0, BLOCK).to(tl.int64)
    m = e < end
    key = tl.load(KEY + e, mask=m, other=0).to(tl.int64)
    return m, e, key, (kv_base + key)[:, None] * D + d[None, :], m[:, None] & dm[None, :]


@triton.jit
def _hash(x):
    x = ((x >> 16) ^ x) * 0x45D9F3B
    x = ((x >> 16) ^ x) * 0x45D9F3B
    return (x >> 16) ^ x


@triton.jit
def dropout_keep(flat, seed_lo, seed_hi, p):
    """The keep decision of `sparse_bias.dense.dropout.dropout_keep` for int64 flat score indices (``seed_lo`` /
    ``seed_hi``: the seed's keys, `sparse_bias.dense.dropout.seed_keys`)."""
    lo = (flat & 0xFFFFFFFF).to(tl.uint32)
    hi = (flat >> 32).to(tl.uint32)
    h = _hash(_hash(lo ^ seed_lo.to(tl.uint32)) ^ hi ^ seed_hi.to(tl.uint32))
    return (h & 0xFFFFFF).to(tl.float32) * (1.0 / 16777216.0) >= p
