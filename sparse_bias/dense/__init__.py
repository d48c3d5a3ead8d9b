"""The dense global pass: unbiased attention with its log-sum-exp and the backward the correction reuses.

* `sparse_bias.dense.lse` -- `dense_lse_forward` / `dense_lse_backward` and the choice of kernel (CPU flash
  private op, CUDA flash / efficient, compiled CPU dropout kernel, Triton dropout kernel, chunked fallback);
* `sparse_bias.dense.chunked` -- the pure-PyTorch kernel (fallback and reference of the GPU checks);
* `sparse_bias.dense.private_ops` -- adapters of PyTorch's private CUDA ops (tested against an emulation);
* `sparse_bias.backends.triton.dense` -- the Triton dense pass with dropout (its kernels with the other Triton kernels);
* `sparse_bias.dense.dropout` -- the counter-hash dropout decision shared by Python, C++ and Triton;
* `sparse_bias.dense.boundary` -- the layouts the kernels assume and the fully-masked-row convention.
"""
from .boundary import fully_masked_rows, kernel_lse, unit_stride
from .dropout import dropout_keep, dropout_mask, dropout_scale, seed64, seed_keys
from .lse import KERNELS, dense_kernel_name, dense_lse_backward, dense_lse_forward

__all__ = ["dense_lse_forward", "dense_lse_backward", "dense_kernel_name", "KERNELS", "unit_stride",
           "kernel_lse", "fully_masked_rows", "dropout_keep", "dropout_mask", "dropout_scale", "seed_keys", "seed64"]
