// The additive attention mask as the kernels read it, shared by the window kernels and the dense pass.
#pragma once
#include <torch/extension.h>

namespace sparse_bias {

// A mask 4-D broadcastable to [B, H, Q, K] (strides 0 where broadcast, -inf = masked), or none.
template <typename acc_t>
struct Mask {
  const acc_t* data = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  explicit Mask(const c10::optional<at::Tensor>& m) {
    if (m.has_value() && m->defined()) {
      data = m->data_ptr<acc_t>();
      sb = m->size(0) > 1 ? m->stride(0) : 0;
      sh = m->size(1) > 1 ? m->stride(1) : 0;
      sq = m->size(2) > 1 ? m->stride(2) : 0;
      sk = m->size(3) > 1 ? m->stride(3) : 0;
    }
  }
  // the mask at (b, h, q, key); 0 without a mask
  inline acc_t operator()(int64_t b, int64_t h, int64_t q, int64_t key) const {
    return data ? data[b * sb + h * sh + q * sq + key * sk] : acc_t(0);
  }
  // the row of (b, h, q) from key k0 on (step sk), or nullptr without a mask
  inline const acc_t* row(int64_t b, int64_t h, int64_t q, int64_t k0) const {
    return data ? data + b * sb + h * sh + q * sq + k0 * sk : nullptr;
  }
};

}  // namespace sparse_bias
