"""Counting the operations that synchronise the host with a GPU, on any device.

On a GPU every ``.item()``, ``bool(tensor)``, ``nonzero``, ``unique`` or size-from-data op makes the host wait until
the device queue drains, and makes a step impossible to capture in a CUDA graph. These reach the dispatcher as the
same aten ops on every device, so `count_host_syncs` counts them on CPU tensors as well -- that is how the test suite
checks that the attention calls never synchronise (docs/gpu.md, "No host sync, torch.compile, CUDA graphs").

Example:

    >>> import torch, sparse_bias as sb
    >>> with sb.count_host_syncs() as syncs:
    ...     _ = torch.arange(4).sum().item()
    >>> syncs.total, dict(syncs.ops)
    (1, {'_local_scalar_dense': 1})
"""
from __future__ import annotations

from collections import Counter
from typing import List

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ._core.compat import custom_op_definitions

__all__ = ["count_host_syncs", "HostSyncCounter", "SYNC_OPS"]

#: aten ops whose result the host must wait for (a scalar read, or an output size that depends on the data)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "_unique", "_unique2", "unique_dim", "unique_consecutive",
            "masked_select", "bincount", "equal", "is_nonzero", "item", "histc", "_assert_async")


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode counting `SYNC_OPS` (and ``repeat_interleave`` without ``output_size``).

    Attributes:
        ops: ``Counter`` of op name -> calls.
        calls: the op names in call order.
    """

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.calls: List[str] = []

    @property
    def total(self) -> int:
        """The number of synchronising ops seen."""
        return sum(self.ops.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func._schema.name.split("::")
        if namespace == "sparse_bias":          # the library's own ops: count what runs inside them too
            impl = custom_op_definitions()[func._schema.name]._init_fn
            with self:
                return impl(*args, **kwargs)
        if name in SYNC_OPS or (name == "repeat_interleave" and func._overloadname == "Tensor"
                                and kwargs.get("output_size") is None):
            self.ops[name] += 1
            self.calls.append(name)
        if func is torch.ops.aten.bitwise_xor.Tensor and not isinstance(args[1], torch.Tensor):
            func = torch.ops.aten.bitwise_xor.Scalar      # torch 2.0 hands ``tensor ^ int`` to a mode as .Tensor
        return func(*args, **kwargs)


def count_host_syncs() -> HostSyncCounter:
    """A context manager counting the host-synchronising aten ops run inside it (on any device)."""
    return HostSyncCounter()
