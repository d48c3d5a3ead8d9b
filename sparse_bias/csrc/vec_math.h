// A vectorisable exp for the kernels' `#pragma omp simd` loops.
//
// glibc's vector math (libmvec) is only used by GCC under -ffinite-math-only, which the kernels cannot have
// (masked scores are -inf), so std::exp(float) stays a scalar call per lane. vexp(float) is the Cephes expf
// polynomial (about 1 ulp on [-87, 88]) written in plain arithmetic the compiler vectorises; inputs below -87
// (-inf included) give 0, NaN stays NaN. Doubles use std::exp.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace sparse_bias {

inline float vexp(float x) {
  const bool tiny = x < -87.0f;
  float xc = x > 88.0f ? 88.0f : x;
  xc = tiny ? -87.0f : xc;
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  // Cody-Waite reduction r = x - n ln2 in two exact steps (fma keeps -ffast-math from merging them)
  float r = std::fma(n, -0.693359375f, xc);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const float res = p * scale;
  return tiny ? 0.0f : (x != x ? x : res);
}

inline double vexp(double x) { return std::exp(x); }

// The running maximum of a row is taken with std::max in vectorised loops, which drops NaN. A row whose maximum
// stayed -inf (every key masked: zeros, docs/conventions.md) is told apart from one whose scores are NaN by this,
// so NaN scores give a NaN row, as the dense version does.
template <typename T>
inline bool any_nan(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (x[i] != x[i]) return true;
  return false;
}

}  // namespace sparse_bias
