// Flash-style dense attention with the counter-hash attention dropout (sparse_bias.kernels.dropout_keep).
#pragma once
#include <torch/extension.h>

#include <tuple>

namespace sparse_bias {

// out [B, H, Q, D] (q's dtype) and lse [B, H, Q] (float32; float64 for float64 input) of
// softmax(scale q k^T + mask) v with each probability of the [B, H, Q, total_keys] scores kept with
// probability 1 - dropout_p (and scaled by 1 / (1 - p)); k, v hold keys key_offset .. key_offset + K.
std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& mask, double scale,
                                                 double dropout_p, int64_t seed, int64_t key_offset,
                                                 int64_t total_keys);

// (dq, dk, dv) of dense_forward for the upstream gradient grad_out and any output tensor `out` (it enters
// only through rowsum(grad_out * out)), with the forward's lse.
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& mask, double scale, double dropout_p, int64_t seed,
    int64_t key_offset, int64_t total_keys);

}  // namespace sparse_bias
