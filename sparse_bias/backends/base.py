"""The window correction of one (batch element, head block), written once on top of three primitives."""
from __future__ import annotations

import torch


class Backend:
    """Base class: :meth:`forward_block` and :meth:`backward_block` built on ``sddmm``, ``spmm`` and ``spmm_t``
    (see :mod:`sparse_bias.backends`). A backend with fused kernels overrides the two block methods."""

    name = "base"
    #: heads per block (None = all)
    head_block = None
    #: whether the backward needs contiguous dq / dk / dv buffers
    needs_contiguous = False

    def can_run(self, device, dtype):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_block(self, win, b, hs, q, k, v, lse, bvals, emask, keep, scale, p_out, den, out, cdt):
        """Window terms of batch element ``b``, heads ``hs``.

        Writes ``p_j = exp(s_j - L)`` into ``p_out [h, n]``, adds ``S`` into ``den [h, Q]`` and ``C`` into
        ``out [h, Q, D]``. ``lse [h, Q]``, ``bvals [h or 1, n]``, ``emask`` (additive mask at the entries) and
        ``keep`` (dropout multipliers) ``[h or 1, n]`` or None.
        """
        e0, e1 = win.batch_range(b)
        local_q = win.row[e0:e1] - b * win.num_queries
        s = self.sddmm(win, b, hs, q, k, cdt).mul_(scale)                                  # s_j
        if emask is not None:
            s += emask
        s -= lse[:, local_q]
        torch.exp(s, out=p_out)                                                            # p_j
        del s
        a = p_out * torch.expm1(bvals)                                                     # a_j
        den.index_add_(1, local_q, a)                                                      # S
        out += self.spmm(win, b, hs, a if keep is None else a * keep, v, cdt)             # C

    def backward_block(self, win, b, hs, q, k, v, gp, go, p, bvals, keep, scale, dq, dk, dv, cdt):
        """Window terms of the backward for batch element ``b``, heads ``hs``.

        ``gp`` is ``g / (1 + S)`` ``[B, H, Q, D]``, ``go = <g', o>`` ``[h, Q]``, ``p [h, n]``. Adds into
        ``dq [h, Q, D]`` (a slice) and ``dk``, ``dv`` ``[B, H, K, D]``; returns the bias gradient ``[h, n]``.
        """
        e0, e1 = win.batch_range(b)
        local_q = win.row[e0:e1] - b * win.num_queries
        a = p * torch.expm1(bvals)
        self.spmm_t(win, b, hs, a if keep is None else a * keep, gp, dv, cdt)             # dv_j += a_j g'
        diff = self.sddmm(win, b, hs, gp, v, cdt)                                          # <g', v_j>
        if keep is not None:
            diff.mul_(keep)
        diff.sub_(go[:, local_q])                                                          # - <g', o>
        d = a.mul_(diff)                                                                   # d_j = a_j (...)
        dq += self.spmm(win, b, hs, d, k, cdt) * scale
        self.spmm_t(win, b, hs, d.mul_(scale), q, dk, cdt)
        return diff.mul_(p).add_(d, alpha=1.0 / scale)                                     # p_j e^b_j (...)
