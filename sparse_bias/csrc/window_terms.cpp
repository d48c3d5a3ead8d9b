// Fused CPU kernels for the window terms of the exact sparse-bias correction (design brief, section 3).
//
// One batch element, all heads, per call. The forward makes one pass over each query's window entries and
// computes the scores, p = exp(s - L), a = p * expm1(b), S and C; the backward makes one pass over each query's
// entries (<g', v_j>, d_j, the dq correction and the bias gradient) and one pass over each key's entries through
// the transposed structure the WindowIndex caches (the dk / dv corrections): every output element is written by
// one thread in a fixed order, so results are bitwise repeatable. Arithmetic in float32 (float64 for float64
// input); bfloat16 / float16 inputs are converted on load.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kMaxHeadDim = 512;

// The counter-based dropout hash of sparse_bias.kernels.dropout_keep, bit for bit.
inline uint64_t hash32(uint64_t x) {
  x = (((x >> 16) ^ x) * 0x45D9F3BULL) & 0xFFFFFFFFULL;
  x = (((x >> 16) ^ x) * 0x45D9F3BULL) & 0xFFFFFFFFULL;
  return (x >> 16) ^ x;
}

inline bool keep_entry(uint64_t seed, uint64_t flat, double p) {
  uint64_t h = hash32((flat & 0xFFFFFFFFULL) ^ (seed & 0xFFFFFFFFULL));
  h = hash32(h ^ (flat >> 32) ^ ((seed >> 32) & 0xFFFFFFFFULL));
  const float uniform = static_cast<float>(h & 0xFFFFFF) * (1.0f / 16777216.0f);
  return uniform >= static_cast<float>(p);
}

// A [B, H, N, D] tensor (last dim contiguous) read at (b, h, n).
template <typename T>
struct Rows {
  const T* data;
  int64_t sb, sh, sn;
  Rows(const at::Tensor& t)
      : data(t.data_ptr<T>()), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)) {}
  inline const T* at(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * sn; }
};

// The additive mask, 4-D broadcastable to [B, H, Q, K] (strides 0 where broadcast), or none.
template <typename acc_t>
struct Mask {
  const acc_t* data = nullptr;
  int64_t sb = 0, sh = 0, sq = 0, sk = 0;
  Mask(const c10::optional<at::Tensor>& m) {
    if (m.has_value() && m->defined()) {
      data = m->data_ptr<acc_t>();
      sb = m->size(0) > 1 ? m->stride(0) : 0;
      sh = m->size(1) > 1 ? m->stride(1) : 0;
      sq = m->size(2) > 1 ? m->stride(2) : 0;
      sk = m->size(3) > 1 ? m->stride(3) : 0;
    }
  }
  inline acc_t operator()(int64_t b, int64_t h, int64_t q, int64_t key) const {
    return data ? data[b * sb + h * sh + q * sq + key * sk] : acc_t(0);
  }
};

template <typename T, typename acc_t>
inline acc_t dot(const acc_t* x, const T* y, int64_t d) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += x[i] * static_cast<acc_t>(y[i]);
  return s;
}

template <typename T, typename acc_t>
inline void axpy(acc_t* acc, acc_t w, const T* y, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += w * static_cast<acc_t>(y[i]);
}

template <typename T, typename acc_t>
inline void load(acc_t* dst, const T* src, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

struct Common {
  int64_t b, heads, nq, nk, d, total_heads, h0;
  double scale, dropout_p;
  uint64_t seed;
};

template <typename T, typename acc_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                  const at::Tensor& crow, const at::Tensor& col, const at::Tensor& bvals,
                  const c10::optional<at::Tensor>& mask, const Common& c, at::Tensor& den, at::Tensor& out) {
  Rows<T> Q(q), K(k), V(v);
  Mask<acc_t> M(mask);
  const int64_t* crow_p = crow.data_ptr<int64_t>();
  const int64_t* col_p = col.data_ptr<int64_t>();
  const acc_t* bv = bvals.data_ptr<acc_t>();
  const int64_t hb = bvals.size(1);
  const acc_t* lse_p = lse.data_ptr<acc_t>();   // [heads, Q] contiguous
  acc_t* den_p = den.data_ptr<acc_t>();         // [heads, Q] contiguous
  acc_t* out_p = out.data_ptr<acc_t>();         // [heads, Q, D] contiguous
  const acc_t scale = static_cast<acc_t>(c.scale);
  const bool drop = c.dropout_p > 0;
  const acc_t inv_keep = drop ? acc_t(1) / static_cast<acc_t>(1 - c.dropout_p) : acc_t(1);
  at::parallel_for(0, c.nq, 8, [&](int64_t r0, int64_t r1) {
    acc_t qv[kMaxHeadDim], acc[kMaxHeadDim];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e0 = crow_p[r], e1 = crow_p[r + 1];
      if (e0 == e1) continue;
      for (int64_t hi = 0; hi < c.heads; ++hi) {
        const int64_t h = c.h0 + hi;
        load(qv, Q.at(c.b, h, r), c.d);
        for (int64_t i = 0; i < c.d; ++i) acc[i] = 0;
        const acc_t L = lse_p[hi * c.nq + r];
        acc_t S = 0;
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t key = col_p[e];
          const acc_t s = dot(qv, K.at(c.b, h, key), c.d) * scale + M(c.b, h, r, key);
          const acc_t p = std::exp(s - L);
          acc_t a = p * std::expm1(bv[e * hb + (hb > 1 ? h : 0)]);
          S += a;
          if (drop) {
            const uint64_t flat = ((static_cast<uint64_t>(c.b) * c.total_heads + h) * c.nq + r) * c.nk + key;
            a = keep_entry(c.seed, flat, c.dropout_p) ? a * inv_keep : acc_t(0);
          }
          if (a != 0) axpy(acc, a, V.at(c.b, h, key), c.d);
        }
        den_p[hi * c.nq + r] += S;
        acc_t* o = out_p + (hi * c.nq + r) * c.d;
        for (int64_t i = 0; i < c.d; ++i) o[i] += acc[i];
      }
    }
  });
}

template <typename T, typename acc_t>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                   const at::Tensor& gp, const at::Tensor& go, const at::Tensor& crow, const at::Tensor& col,
                   const at::Tensor& tcrow, const at::Tensor& trow, const at::Tensor& perm, const at::Tensor& bvals,
                   const c10::optional<at::Tensor>& mask, const Common& c, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv, at::Tensor& dbias) {
  Rows<T> Q(q), K(k), V(v);
  Mask<acc_t> M(mask);
  const int64_t* crow_p = crow.data_ptr<int64_t>();
  const int64_t* col_p = col.data_ptr<int64_t>();
  const acc_t* bv = bvals.data_ptr<acc_t>();
  const int64_t hb = bvals.size(1);
  const acc_t* lse_p = lse.data_ptr<acc_t>();   // [heads, Q]
  const acc_t* gp_p = gp.data_ptr<acc_t>();     // [heads, Q, D] contiguous: g' = g / (1 + S)
  const acc_t* go_p = go.data_ptr<acc_t>();     // [heads, Q]: <g', o>
  acc_t* dq_p = dq.data_ptr<acc_t>();           // [heads, Q, D] contiguous
  acc_t* db_p = dbias.data_ptr<acc_t>();        // [n, heads]
  const int64_t n = col.numel();
  const acc_t scale = static_cast<acc_t>(c.scale);
  const bool drop = c.dropout_p > 0;
  const acc_t inv_keep = drop ? acc_t(1) / static_cast<acc_t>(1 - c.dropout_p) : acc_t(1);
  // per (entry, head): a * keep (for dv) and scale * d (for dk)
  std::vector<acc_t> ak(static_cast<size_t>(n * c.heads)), dd(static_cast<size_t>(n * c.heads));

  at::parallel_for(0, c.nq, 8, [&](int64_t r0, int64_t r1) {
    acc_t qv[kMaxHeadDim], gv[kMaxHeadDim], acc[kMaxHeadDim];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t e0 = crow_p[r], e1 = crow_p[r + 1];
      if (e0 == e1) continue;
      for (int64_t hi = 0; hi < c.heads; ++hi) {
        const int64_t h = c.h0 + hi;
        load(qv, Q.at(c.b, h, r), c.d);
        const acc_t* g = gp_p + (hi * c.nq + r) * c.d;
        for (int64_t i = 0; i < c.d; ++i) { gv[i] = g[i]; acc[i] = 0; }
        const acc_t L = lse_p[hi * c.nq + r], go_r = go_p[hi * c.nq + r];
        for (int64_t e = e0; e < e1; ++e) {
          const int64_t key = col_p[e];
          const acc_t s = dot(qv, K.at(c.b, h, key), c.d) * scale + M(c.b, h, r, key);
          const acc_t p = std::exp(s - L);
          const acc_t a = p * std::expm1(bv[e * hb + (hb > 1 ? h : 0)]);
          acc_t keep = 1;
          if (drop) {
            const uint64_t flat = ((static_cast<uint64_t>(c.b) * c.total_heads + h) * c.nq + r) * c.nk + key;
            keep = keep_entry(c.seed, flat, c.dropout_p) ? inv_keep : acc_t(0);
          }
          const acc_t diff = (keep != 0 ? dot(gv, V.at(c.b, h, key), c.d) * keep : acc_t(0)) - go_r;
          const acc_t dj = a * diff;
          if (dj != 0) axpy(acc, dj, K.at(c.b, h, key), c.d);
          db_p[e * c.heads + hi] = p * diff + dj;               // p e^b (keep <g', v_j> - <g', o>)
          ak[e * c.heads + hi] = a * keep;
          dd[e * c.heads + hi] = dj * scale;
        }
        acc_t* dqr = dq_p + (hi * c.nq + r) * c.d;
        for (int64_t i = 0; i < c.d; ++i) dqr[i] += scale * acc[i];
      }
    }
  });

  // dk_j += scale d_j q, dv_j += a_j keep_j g' -- per key, its entries in a fixed (stable key-sorted) order
  const int64_t* tcrow_p = tcrow.data_ptr<int64_t>();
  const int64_t* trow_p = trow.data_ptr<int64_t>();
  const int64_t* perm_p = perm.data_ptr<int64_t>();
  T* dk_p = dk.data_ptr<T>();
  T* dv_p = dv.data_ptr<T>();
  const int64_t kb = dk.stride(0), kh = dk.stride(1), kn = dk.stride(2);
  const int64_t vb = dv.stride(0), vh = dv.stride(1), vn = dv.stride(2);
  at::parallel_for(0, c.nk, 64, [&](int64_t k0, int64_t k1) {
    acc_t acck[kMaxHeadDim], accv[kMaxHeadDim];
    for (int64_t key = k0; key < k1; ++key) {
      const int64_t t0 = tcrow_p[key], t1 = tcrow_p[key + 1];
      if (t0 == t1) continue;
      for (int64_t hi = 0; hi < c.heads; ++hi) {
        const int64_t h = c.h0 + hi;
        for (int64_t i = 0; i < c.d; ++i) { acck[i] = 0; accv[i] = 0; }
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t e = perm_p[t], r = trow_p[t];
          const acc_t wk = dd[e * c.heads + hi], wv = ak[e * c.heads + hi];
          if (wk != 0) axpy(acck, wk, Q.at(c.b, h, r), c.d);
          if (wv != 0) axpy(accv, wv, gp_p + (hi * c.nq + r) * c.d, c.d);
        }
        T* dkr = dk_p + c.b * kb + h * kh + key * kn;
        T* dvr = dv_p + c.b * vb + h * vh + key * vn;
        for (int64_t i = 0; i < c.d; ++i) {
          dkr[i] = static_cast<T>(static_cast<acc_t>(dkr[i]) + acck[i]);
          dvr[i] = static_cast<T>(static_cast<acc_t>(dvr[i]) + accv[i]);
        }
      }
    }
  });
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, " must be [B, H, N, D] with a contiguous last dim");
  TORCH_CHECK(t.size(3) <= kMaxHeadDim, name, ": head dim above ", kMaxHeadDim);
}

Common make_common(const at::Tensor& q, const at::Tensor& k, int64_t b, int64_t h0, int64_t heads, double scale,
                   double dropout_p, int64_t seed) {
  check_rows(q, "q");
  check_rows(k, "k");
  Common c;
  c.b = b; c.h0 = h0; c.heads = heads; c.total_heads = q.size(1); c.nq = q.size(2); c.nk = k.size(2);
  c.d = q.size(3); c.scale = scale; c.dropout_p = dropout_p; c.seed = static_cast<uint64_t>(seed);
  return c;
}

}  // namespace

// Adds S into den [heads, Q] and C into out [heads, Q, D] for batch element b, heads h0 .. h0 + heads.
void window_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& bvals,
                    const c10::optional<at::Tensor>& mask, int64_t b, int64_t h0, int64_t heads, double scale,
                    double dropout_p, int64_t seed, at::Tensor den, at::Tensor out) {
  const Common c = make_common(q, k, b, h0, heads, scale, dropout_p, seed);
  check_rows(v, "v");
  TORCH_CHECK(den.is_contiguous() && out.is_contiguous() && lse.is_contiguous() && bvals.is_contiguous(),
              "den, out, lse and bvals must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "window_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_impl<scalar_t, acc_t>(q, k, v, lse, crow, col, bvals, mask, c, den, out);
  });
}

// Adds the window terms of the backward into dq [heads, Q, D] and dk, dv [B, H, K, D]; writes dbias [n, heads].
void window_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                     const at::Tensor& gp, const at::Tensor& go, const at::Tensor& crow, const at::Tensor& col,
                     const at::Tensor& tcrow, const at::Tensor& trow, const at::Tensor& perm, const at::Tensor& bvals,
                     const c10::optional<at::Tensor>& mask, int64_t b, int64_t h0, int64_t heads, double scale,
                     double dropout_p, int64_t seed, at::Tensor dq, at::Tensor dk, at::Tensor dv, at::Tensor dbias) {
  const Common c = make_common(q, k, b, h0, heads, scale, dropout_p, seed);
  check_rows(v, "v");
  check_rows(dk, "dk");
  check_rows(dv, "dv");
  TORCH_CHECK(gp.is_contiguous() && go.is_contiguous() && dq.is_contiguous() && dbias.is_contiguous() &&
                  lse.is_contiguous() && bvals.is_contiguous(),
              "gp, go, dq, dbias, lse and bvals must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "window_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_impl<scalar_t, acc_t>(q, k, v, lse, gp, go, crow, col, tcrow, trow, perm, bvals, mask, c, dq, dk,
                                   dv, dbias);
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_bias fused CPU kernels for the window terms of the exact correction";
  m.def("window_forward", &window_forward, "window terms of the forward (one batch element, a block of heads)");
  m.def("window_backward", &window_backward, "window terms of the backward (one batch element, a block of heads)");
}
