"""The tensors the window-term kernels read, derived once per `sparse_bias.WindowIndex` over the whole batch.

Every kernel works on the global CSR structure of ``B * Q`` rows (row ``r = b * Q + q``) -- never on one batch
element's slice, whose entry range would be a device value the host must read. `Entries` carries the index
tensors and the sizes; `build_entries` derives the rest without reading a device value (no host sync): the row of
each entry (``repeat_interleave`` with ``output_size``), the transposed structure (entries sorted by their global
column ``b * K + key``, pointers by ``searchsorted``) and the row order of the fused CPU kernels.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch

__all__ = ["Entries", "build_entries"]


class Entries(NamedTuple):
    """The window entries of a `sparse_bias.WindowIndex` as the kernels read them.

    Attributes:
        indptr: LongTensor ``[B * Q + 1]``: row ``r``'s entries are ``indptr[r]:indptr[r + 1]``.
        key: LongTensor ``[nnz]``: the key of each entry, in ``[0, K)``.
        row: LongTensor ``[nnz]``: the row ``b * Q + q`` of each entry.
        tcrow: LongTensor ``[B * K + 1]``: CSR pointers of the transpose (rows = global keys ``b * K + key``).
        trow: LongTensor ``[nnz]``: the row of each entry of the transpose, in its order.
        perm: LongTensor ``[nnz]``: entry ``perm[t]`` is entry ``t`` of the transpose (a stable sort by key).
        order: LongTensor ``[B * Q]``: rows sorted by (batch element, first window key) -- consecutive rows then
            share window keys (the fused CPU kernels walk rows in this order).
        batch, queries, keys: ``B``, ``Q`` and ``K``.
    """

    indptr: torch.Tensor
    key: torch.Tensor
    row: torch.Tensor
    tcrow: torch.Tensor
    trow: torch.Tensor
    perm: torch.Tensor
    order: torch.Tensor
    batch: int
    queries: int
    keys: int

    @property
    def nnz(self) -> int:
        return self.key.shape[0]

    @property
    def rows(self) -> int:
        """``B * Q``."""
        return self.batch * self.queries

    def as_args(self) -> List[torch.Tensor]:
        """The index tensors as the registered ops take them (one list argument); the sizes come back from q and k
        (`from_args`)."""
        return [self.indptr, self.key, self.row, self.tcrow, self.trow, self.perm, self.order]

    @classmethod
    def from_args(cls, index: Sequence[torch.Tensor], q: torch.Tensor, k: torch.Tensor) -> Optional["Entries"]:
        """The record inside an op from `as_args`'s list and q ``[B, H, Q, D]`` / k ``[B, H, K, D]``; None for an
        empty list (no bias)."""
        if len(index) == 0:
            return None
        return cls(*index, q.shape[0], q.shape[2], k.shape[2])

    def entry_batch(self) -> torch.Tensor:
        """LongTensor ``[nnz]``: the batch element of each entry."""
        return torch.div(self.row, max(self.queries, 1), rounding_mode="floor")

    def counts(self) -> torch.Tensor:
        """LongTensor ``[B * Q]``: entries per row."""
        return self.indptr[1:] - self.indptr[:-1]


def entry_rows(indptr: torch.Tensor, nnz: int) -> torch.Tensor:
    """LongTensor ``[nnz]``: the CSR row of every entry (no host sync: the output size is given)."""
    rows = indptr.shape[0] - 1
    return torch.repeat_interleave(torch.arange(rows, device=indptr.device), indptr[1:] - indptr[:-1],
                                   output_size=nnz)


def build_entries(indptr: torch.Tensor, key: torch.Tensor, batch: int, queries: int, keys: int,
                  row: torch.Tensor = None) -> Entries:
    """`Entries` of a valid CSR index (``indptr`` ``[B * Q + 1]``, ``key`` ``[nnz]``); no host sync."""
    nnz = key.shape[0]
    row = entry_rows(indptr, nnz) if row is None else row
    gcol = torch.div(row, max(queries, 1), rounding_mode="floor") * keys + key     # global key b * K + key
    perm = torch.sort(gcol, stable=True).indices
    tcrow = torch.searchsorted(gcol[perm], torch.arange(batch * keys + 1, device=key.device))
    trow = row[perm]
    counts = indptr[1:] - indptr[:-1]
    first = key[indptr[:-1].clamp(max=max(nnz - 1, 0))] if nnz else torch.zeros_like(counts)
    first = torch.where(counts > 0, first, torch.full_like(first, -1))
    rank = torch.div(torch.arange(batch * queries, device=key.device), max(queries, 1),
                     rounding_mode="floor") * (keys + 1) + first + 1
    order = torch.sort(rank, stable=True).indices
    return Entries(indptr, key, row, tcrow, trow, perm, order, batch, queries, keys)
