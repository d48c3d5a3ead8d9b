"""Former home of the dense pass and the dropout hash, kept so that ``sparse_bias.kernels.dropout_keep`` and
friends keep importing; the code lives in `sparse_bias.dense`."""
from ._call import compute_dtype
from .dense import (KernelState, dense_kernel_name, dense_lse_backward, dense_lse_forward, dropout_keep, dropout_mask,
                    dropout_scale, seed64, seed_keys, unit_stride)

__all__ = ["dense_lse_forward", "dense_lse_backward", "dense_kernel_name", "KernelState", "dropout_keep",
           "dropout_mask", "dropout_scale", "seed_keys", "seed64", "compute_dtype", "unit_stride"]
