// Fused CPU kernels for the window terms of the exact sparse-bias correction.
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
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "dense_dropout.h"
#include "dropout_hash.h"
#include "mask.h"
#include "parallel.h"
#include "vec_math.h"

namespace {

constexpr int64_t kMaxHeadDim = 512;

using sparse_bias::keep_entry;
using sparse_bias::vexp;
using sparse_bias::Mask;
using sparse_bias::parallel_items;

// A [B, H, N, D] tensor (last dim contiguous) read at (b, h, n).
template <typename T>
struct Rows {
  const T* data;
  int64_t sb, sh, sn;
  Rows(const at::Tensor& t)
      : data(t.data_ptr<T>()), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)) {}
  inline const T* at(int64_t b, int64_t h, int64_t n) const { return data + b * sb + h * sh + n * sn; }
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

// The multiply-adds of a pass that makes `ops` row operations of d numbers per entry and head (the grain of
// parallel_items: a small call runs on the calling thread).
inline double pass_work(const int64_t* ptr, int64_t n, int64_t heads, int64_t d, int64_t ops) {
  return static_cast<double>(ptr[n] - ptr[0]) * static_cast<double>(heads) * static_cast<double>(d * ops);
}

// The longest CSR segment of ptr[0 .. n] (the size of a per-row scratch buffer).
inline int64_t longest_segment(const int64_t* ptr, int64_t n) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, ptr[i + 1] - ptr[i]);
  return m;
}

struct Common {
  int64_t b, heads, nq, nk, d, total_heads, h0;
  bool window = false;  // window attention: p is the window softmax (a = p, d bias = ds), rows with L = -inf are empty
  double scale, dropout_p;
  uint64_t seed;
};

// Scores s_e = scale <q, k_e> + mask_e and p_e = exp(s_e - L) of one (row, head) into buf[0 .. e1 - e0).
template <int DC, typename T, typename acc_t>
inline void row_probs(const acc_t* qv, const Rows<T>& K, const Mask<acc_t>& M, const int64_t* col_p, int64_t e0,
                      int64_t e1, const Common& c, int64_t h, int64_t r, acc_t L, acc_t* buf,
                      const acc_t* sb = nullptr, int64_t sbh = 1, int64_t hi = 0) {
  const int64_t d = DC > 0 ? DC : c.d;
  const acc_t scale = static_cast<acc_t>(c.scale);
  for (int64_t e = e0; e < e1; ++e) {
    const int64_t key = col_p[e];
    buf[e - e0] = dot(qv, K.at(c.b, h, key), d) * scale + M(c.b, h, r, key) - L;
    if (sb) buf[e - e0] += sb[e * sbh + (sbh > 1 ? hi : 0)];
  }
  const int64_t n = e1 - e0;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = vexp(buf[i]);
}

// keep_e / (1 - p) of one (row, head) into keep[0 .. e1 - e0); false when there is no dropout.
template <typename acc_t>
inline void row_keep(const int64_t* col_p, int64_t e0, int64_t e1, const Common& c, int64_t h, int64_t r,
                     acc_t* keep) {
  const acc_t inv = acc_t(1) / static_cast<acc_t>(1 - c.dropout_p);
  const uint64_t base = ((static_cast<uint64_t>(c.b) * c.total_heads + h) * c.nq + r) * c.nk;
  for (int64_t e = e0; e < e1; ++e) keep[e - e0] = keep_entry(c.seed, base + col_p[e], c.dropout_p) ? inv : acc_t(0);
}

// One batch element's window entries in CSR form: row pointers, entry keys, and the rows in spatial order
// (neighbours share window keys, so walking rows in this order keeps their k / v rows in cache).
struct Csr {
  const int64_t* crow;
  const int64_t* col;
  const int64_t* order;
  Csr(const at::Tensor& crow_, const at::Tensor& col_, const at::Tensor& order_)
      : crow(crow_.data_ptr<int64_t>()), col(col_.data_ptr<int64_t>()), order(order_.data_ptr<int64_t>()) {}
};

template <int DC, typename T, typename acc_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                  const at::Tensor& crow, const at::Tensor& col, const at::Tensor& order, const at::Tensor& ebias,
                  const c10::optional<at::Tensor>& mask, const Common& c, at::Tensor& den, at::Tensor& removed,
                  at::Tensor& out) {
  const int64_t d = DC > 0 ? DC : c.d;
  Rows<T> Q(q), K(k), V(v);
  Mask<acc_t> M(mask);
  const Csr E(crow, col, order);
  const acc_t* eb = ebias.data_ptr<acc_t>();    // expm1(bias) [n, 1 or heads]
  const int64_t hb = ebias.size(1);
  const acc_t* lse_p = lse.data_ptr<acc_t>();   // [heads, Q] contiguous
  acc_t* den_p = den.data_ptr<acc_t>();         // [heads, Q] contiguous
  acc_t* rem_p = removed.data_ptr<acc_t>();     // [heads, Q] contiguous
  acc_t* out_p = out.data_ptr<acc_t>();         // [heads, Q, D] contiguous
  const bool drop = c.dropout_p > 0;
  const int64_t max_row = longest_segment(E.crow, c.nq);
  // head-major: one head's keys and values (K x D each) stay in cache while its queries are processed;
  // per entry a dot product and a row update
  parallel_items(c.heads * c.nq, pass_work(E.crow, c.nq, c.heads, d, 2), [&](int64_t i0, int64_t i1) {
    acc_t qv[kMaxHeadDim], acc[kMaxHeadDim];
    std::vector<acc_t> buf(static_cast<size_t>(max_row));
    std::vector<acc_t> keep(drop ? static_cast<size_t>(max_row) : 0);
    for (int64_t idx = i0; idx < i1; ++idx) {
      const int64_t hi = idx / c.nq, r = E.order[idx % c.nq];
      const int64_t e0 = E.crow[r], e1 = E.crow[r + 1], n = e1 - e0;
      if (n == 0) continue;
      {
        const int64_t h = c.h0 + hi;
        load(qv, Q.at(c.b, h, r), d);
        row_probs<DC>(qv, K, M, E.col, e0, e1, c, h, r, lse_p[hi * c.nq + r], buf.data());   // p_e
        const acc_t* ebr = eb + e0 * hb + (hb > 1 ? hi : 0);
        acc_t S = 0, R = 0;
#pragma omp simd reduction(+ : S, R)
        for (int64_t i = 0; i < n; ++i) {
          buf[i] *= ebr[i * hb];                                                        // a_e
          S += buf[i];
          R += buf[i] < 0 ? -buf[i] : acc_t(0);                                         // removed mass
        }
        if (drop) {
          row_keep(E.col, e0, e1, c, h, r, keep.data());
          for (int64_t i = 0; i < n; ++i) buf[i] *= keep[i];
        }
        for (int64_t i = 0; i < d; ++i) acc[i] = 0;
        for (int64_t i = 0; i < n; ++i)
          if (buf[i] != 0) axpy(acc, buf[i], V.at(c.b, h, E.col[e0 + i]), d);           // C
        den_p[hi * c.nq + r] += S;
        rem_p[hi * c.nq + r] += R;
        acc_t* o = out_p + (hi * c.nq + r) * d;
        for (int64_t i = 0; i < d; ++i) o[i] += acc[i];
      }
    }
  });
}

template <int DC, typename T, typename acc_t>
void backward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                   const at::Tensor& gp, const at::Tensor& go, const at::Tensor& crow, const at::Tensor& col,
                   const at::Tensor& order, const at::Tensor& tcrow, const at::Tensor& trow, const at::Tensor& ebias,
                   const at::Tensor& ebias_t, const c10::optional<at::Tensor>& sbias,
                   const c10::optional<at::Tensor>& sbias_t, const c10::optional<at::Tensor>& mask, const Common& c,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dbias) {
  const int64_t d = DC > 0 ? DC : c.d;
  Rows<T> Q(q), K(k), V(v);
  Mask<acc_t> M(mask);
  const Csr E(crow, col, order);
  const acc_t* eb = ebias.data_ptr<acc_t>();     // expm1(bias) [n, 1 or heads], entry order
  const acc_t* ebt = ebias_t.data_ptr<acc_t>();  // the same in the transposed (key-sorted) order
  const int64_t hb = ebias.size(1);
  const bool has_sb = sbias.has_value() && sbias->defined();   // window attention: the bias is in the scores
  const acc_t* sb = has_sb ? sbias->data_ptr<acc_t>() : nullptr;
  const acc_t* sbt = has_sb ? sbias_t->data_ptr<acc_t>() : nullptr;
  const int64_t sbh = has_sb ? sbias->size(1) : 1;
  const acc_t* lse_p = lse.data_ptr<acc_t>();    // [heads, Q]
  const acc_t* gp_p = gp.data_ptr<acc_t>();      // [heads, Q, D] contiguous: g' = g / (1 + S)
  const acc_t* go_p = go.data_ptr<acc_t>();      // [heads, Q]: <g', o>
  acc_t* dq_p = dq.data_ptr<acc_t>();            // [heads, Q, D] contiguous
  acc_t* db_p = dbias.data_ptr<acc_t>();         // [heads, n]
  const int64_t n_all = col.numel();
  const acc_t scale = static_cast<acc_t>(c.scale);
  const bool drop = c.dropout_p > 0;
  const int64_t max_row = longest_segment(E.crow, c.nq);
  const int64_t* tcrow_p = tcrow.data_ptr<int64_t>();
  const int64_t* trow_p = trow.data_ptr<int64_t>();
  const int64_t max_col = longest_segment(tcrow_p, c.nk);

  // Per query (head-major): d_j = a_j (keep_j <g', v_j> - <g', o>), dq += scale sum_j d_j k_j, the bias gradient
  // (per entry two dot products and a row update).
  parallel_items(c.heads * c.nq, pass_work(E.crow, c.nq, c.heads, d, 3), [&](int64_t i0, int64_t i1) {
    acc_t qv[kMaxHeadDim], gv[kMaxHeadDim], acc[kMaxHeadDim];
    std::vector<acc_t> p(static_cast<size_t>(max_row)), keep(drop ? static_cast<size_t>(max_row) : 0);
    for (int64_t idx = i0; idx < i1; ++idx) {
      const int64_t hi = idx / c.nq, r = E.order[idx % c.nq], h = c.h0 + hi;
      const int64_t e0 = E.crow[r], e1 = E.crow[r + 1], n = e1 - e0;
      if (n == 0) continue;
      const acc_t L = lse_p[hi * c.nq + r];
      if (c.window && L == -std::numeric_limits<acc_t>::infinity()) continue;  // empty / fully masked: no gradient
      load(qv, Q.at(c.b, h, r), d);
      const acc_t* g = gp_p + (hi * c.nq + r) * d;
      for (int64_t i = 0; i < d; ++i) { gv[i] = g[i]; acc[i] = 0; }
      row_probs<DC>(qv, K, M, E.col, e0, e1, c, h, r, L, p.data(), sb, sbh, hi);            // p_e
      if (drop) row_keep(E.col, e0, e1, c, h, r, keep.data());
      const acc_t go_r = go_p[hi * c.nq + r];
      const acc_t* ebr = eb + e0 * hb + (hb > 1 ? hi : 0);
      acc_t* dbr = db_p + hi * n_all + e0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t key = E.col[e0 + i];
        const acc_t kp = drop ? keep[i] : acc_t(1);
        const acc_t diff = (kp != 0 ? dot(gv, V.at(c.b, h, key), d) * kp : acc_t(0)) - go_r;
        const acc_t dj = (c.window ? p[i] : p[i] * ebr[i * hb]) * diff;
        dbr[i] = c.window ? dj : p[i] * diff;       // correction: p (keep <g', v_j> - <g', o>), times e^b by the caller
        if (dj != 0) axpy(acc, dj, K.at(c.b, h, key), d);
      }
      acc_t* dqr = dq_p + (hi * c.nq + r) * d;
      for (int64_t i = 0; i < d; ++i) dqr[i] += scale * acc[i];
    }
  });

  // Per key (head-major, the transposed structure): dk_j += scale sum d_j q, dv_j += sum a_j keep_j g'. The
  // entry terms are recomputed from the key's own k / v rows and the (cache-resident) query rows, in a fixed order.
  T* dk_p = dk.data_ptr<T>();
  T* dv_p = dv.data_ptr<T>();
  const int64_t kb = dk.stride(0), kh = dk.stride(1), kn = dk.stride(2);
  const int64_t vb = dv.stride(0), vh = dv.stride(1), vn = dv.stride(2);
  // (per entry two dot products and two row updates)
  parallel_items(c.heads * c.nk, pass_work(tcrow_p, c.nk, c.heads, d, 4), [&](int64_t i0, int64_t i1) {
    acc_t kv[kMaxHeadDim], vv[kMaxHeadDim], acck[kMaxHeadDim], accv[kMaxHeadDim];
    std::vector<acc_t> s(static_cast<size_t>(max_col));
    for (int64_t idx = i0; idx < i1; ++idx) {
      const int64_t hi = idx / c.nk, key = idx % c.nk, h = c.h0 + hi;
      const int64_t t0 = tcrow_p[key], t1 = tcrow_p[key + 1], n = t1 - t0;
      if (n == 0) continue;
      load(kv, K.at(c.b, h, key), d);
      load(vv, V.at(c.b, h, key), d);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = trow_p[t0 + i];
        const acc_t L = lse_p[hi * c.nq + r];
        s[i] = (c.window && L == -std::numeric_limits<acc_t>::infinity()) ? -std::numeric_limits<acc_t>::infinity()
                                           : dot(kv, Q.at(c.b, h, r), d) * scale + M(c.b, h, r, key) - L;
        if (has_sb) s[i] += sbt[(t0 + i) * sbh + (sbh > 1 ? hi : 0)];
      }
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) s[i] = vexp(s[i]);                                // p
      for (int64_t i = 0; i < d; ++i) { acck[i] = 0; accv[i] = 0; }
      const acc_t* ebk = ebt + t0 * hb + (hb > 1 ? hi : 0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = trow_p[t0 + i];
        acc_t kp = 1;
        if (drop) {
          const uint64_t flat = ((static_cast<uint64_t>(c.b) * c.total_heads + h) * c.nq + r) * c.nk + key;
          kp = keep_entry(c.seed, flat, c.dropout_p) ? acc_t(1) / static_cast<acc_t>(1 - c.dropout_p) : acc_t(0);
        }
        const acc_t a = c.window ? s[i] : s[i] * ebk[i * hb];
        if (a == 0) continue;
        const acc_t* g = gp_p + (hi * c.nq + r) * d;
        const acc_t diff = (kp != 0 ? dot(vv, g, d) * kp : acc_t(0)) - go_p[hi * c.nq + r];
        axpy(acck, a * diff * scale, Q.at(c.b, h, r), d);
        if (kp != 0) axpy(accv, a * kp, g, d);
      }
      T* dkr = dk_p + c.b * kb + h * kh + key * kn;
      T* dvr = dv_p + c.b * vb + h * vh + key * vn;
      for (int64_t i = 0; i < d; ++i) {
        dkr[i] = static_cast<T>(static_cast<acc_t>(dkr[i]) + acck[i]);
        dvr[i] = static_cast<T>(static_cast<acc_t>(dvr[i]) + accv[i]);
      }
    }
  });
}

template <int DC, typename T, typename acc_t>
void attn_forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& crow,
                       const at::Tensor& col, const at::Tensor& order, const c10::optional<at::Tensor>& sbias,
                       const c10::optional<at::Tensor>& mask, const Common& c, at::Tensor& lse, at::Tensor& out) {
  const int64_t d = DC > 0 ? DC : c.d;
  Rows<T> Q(q), K(k), V(v);
  Mask<acc_t> M(mask);
  const Csr E(crow, col, order);
  const bool has_sb = sbias.has_value() && sbias->defined();
  const acc_t* sb = has_sb ? sbias->data_ptr<acc_t>() : nullptr;
  const int64_t sbh = has_sb ? sbias->size(1) : 1;
  acc_t* lse_p = lse.data_ptr<acc_t>();         // [heads, Q]: the window log-sum-exp (-inf: empty window)
  acc_t* out_p = out.data_ptr<acc_t>();         // [heads, Q, D]
  const bool drop = c.dropout_p > 0;
  const int64_t max_row = longest_segment(E.crow, c.nq);
  // per entry a dot product and a row update
  parallel_items(c.heads * c.nq, pass_work(E.crow, c.nq, c.heads, d, 2), [&](int64_t i0, int64_t i1) {
    acc_t qv[kMaxHeadDim], acc[kMaxHeadDim];
    std::vector<acc_t> buf(static_cast<size_t>(max_row)), keep(drop ? static_cast<size_t>(max_row) : 0);
    for (int64_t idx = i0; idx < i1; ++idx) {
      const int64_t hi = idx / c.nq, r = E.order[idx % c.nq], h = c.h0 + hi;
      const int64_t e0 = E.crow[r], e1 = E.crow[r + 1], n = e1 - e0;
      lse_p[hi * c.nq + r] = -std::numeric_limits<acc_t>::infinity();
      if (n == 0) continue;
      load(qv, Q.at(c.b, h, r), d);
      const acc_t scale = static_cast<acc_t>(c.scale);
      acc_t m = -std::numeric_limits<acc_t>::infinity();
      for (int64_t i = 0; i < n; ++i) {
        const int64_t key = E.col[e0 + i];
        buf[i] = dot(qv, K.at(c.b, h, key), d) * scale + M(c.b, h, r, key);
        if (has_sb) buf[i] += sb[(e0 + i) * sbh + (sbh > 1 ? hi : 0)];
        m = std::max(m, buf[i]);
      }
      if (m == -std::numeric_limits<acc_t>::infinity()) {  // every window key masked: zeros (+inf: NaN, as SDPA)
        if (!sparse_bias::any_nan(buf.data(), n)) continue;
        m = std::numeric_limits<acc_t>::quiet_NaN();        // NaN scores: a NaN row, as the dense version
      }
      acc_t l = 0;
#pragma omp simd reduction(+ : l)
      for (int64_t i = 0; i < n; ++i) {
        buf[i] = vexp(buf[i] - m);
        l += buf[i];
      }
      lse_p[hi * c.nq + r] = m + std::log(l);
      const acc_t inv = acc_t(1) / l;
      if (drop) row_keep(E.col, e0, e1, c, h, r, keep.data());
      for (int64_t i = 0; i < d; ++i) acc[i] = 0;
      for (int64_t i = 0; i < n; ++i) {
        const acc_t w = buf[i] * inv * (drop ? keep[i] : acc_t(1));
        if (w != 0) axpy(acc, w, V.at(c.b, h, E.col[e0 + i]), d);
      }
      acc_t* o = out_p + (hi * c.nq + r) * d;
      for (int64_t i = 0; i < d; ++i) o[i] = acc[i];
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

// Adds S into den [heads, Q], the removed mass R = sum max(0, -a_e) into removed [heads, Q] and C into
// out [heads, Q, D] for batch element b, heads h0 .. h0 + heads.
// ebias = expm1(bias values) [n, 1 or heads] in the compute dtype.
void correction_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                    const at::Tensor& crow, const at::Tensor& col, const at::Tensor& order, const at::Tensor& ebias,
                    const c10::optional<at::Tensor>& mask, int64_t b, int64_t h0, int64_t heads, double scale,
                    double dropout_p, int64_t seed, at::Tensor den, at::Tensor removed, at::Tensor out) {
  const Common c = make_common(q, k, b, h0, heads, scale, dropout_p, seed);
  check_rows(v, "v");
  TORCH_CHECK(den.is_contiguous() && removed.is_contiguous() && out.is_contiguous() && lse.is_contiguous() &&
                  ebias.is_contiguous(),
              "den, removed, out, lse and ebias must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "correction_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    switch (c.d) {  // the common head dims get fully unrolled row operations
      case 32: forward_impl<32, scalar_t, acc_t>(q, k, v, lse, crow, col, order, ebias, mask, c, den, removed, out); break;
      case 64: forward_impl<64, scalar_t, acc_t>(q, k, v, lse, crow, col, order, ebias, mask, c, den, removed, out); break;
      default: forward_impl<0, scalar_t, acc_t>(q, k, v, lse, crow, col, order, ebias, mask, c, den, removed, out);
    }
  });
}

// Adds the window terms of the backward into dq [heads, Q, D] and dk, dv [B, H, K, D]; writes dbias [heads, n].
// ebias_t = ebias in the transposed (key-sorted) entry order.
// window: the backward of window attention (the bias sbias is in the scores, ebias unused) rather than of the
// correction (ebias = expm1(bias), no sbias).
static void backward_terms(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                           const at::Tensor& gp, const at::Tensor& go, const at::Tensor& crow, const at::Tensor& col,
                           const at::Tensor& order, const at::Tensor& tcrow, const at::Tensor& trow,
                           const at::Tensor& ebias, const at::Tensor& ebias_t, const c10::optional<at::Tensor>& sbias,
                           const c10::optional<at::Tensor>& sbias_t, bool window,
                           const c10::optional<at::Tensor>& mask, int64_t b, int64_t h0, int64_t heads, double scale,
                           double dropout_p, int64_t seed, at::Tensor dq, at::Tensor dk, at::Tensor dv,
                           at::Tensor dbias) {
  Common c = make_common(q, k, b, h0, heads, scale, dropout_p, seed);
  c.window = window;
  check_rows(v, "v");
  check_rows(dk, "dk");
  check_rows(dv, "dv");
  TORCH_CHECK(gp.is_contiguous() && go.is_contiguous() && dq.is_contiguous() && dbias.is_contiguous() &&
                  lse.is_contiguous() && ebias.is_contiguous() && ebias_t.is_contiguous(),
              "gp, go, dq, dbias, lse and ebias must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "backward_terms", [&] {
    using acc_t = at::opmath_type<scalar_t>;
switch (c.d) {  // the common head dims get fully unrolled row operations
      case 32: backward_impl<32, scalar_t, acc_t>(q, k, v, lse, gp, go, crow, col, order, tcrow, trow, ebias, ebias_t, sbias, sbias_t, mask,
                                                  c, dq, dk, dv, dbias); break;
      case 64: backward_impl<64, scalar_t, acc_t>(q, k, v, lse, gp, go, crow, col, order, tcrow, trow, ebias, ebias_t, sbias, sbias_t, mask,
                                                  c, dq, dk, dv, dbias); break;
      default: backward_impl<0, scalar_t, acc_t>(q, k, v, lse, gp, go, crow, col, order, tcrow, trow, ebias, ebias_t, sbias, sbias_t, mask,
                                                 c, dq, dk, dv, dbias);
    }
  });
}

// The correction's window terms of the backward (see backward_terms).
void correction_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                         const at::Tensor& gp, const at::Tensor& go, const at::Tensor& crow, const at::Tensor& col,
                         const at::Tensor& order, const at::Tensor& tcrow, const at::Tensor& trow,
                         const at::Tensor& ebias, const at::Tensor& ebias_t, const c10::optional<at::Tensor>& mask,
                         int64_t b, int64_t h0, int64_t heads, double scale, double dropout_p, int64_t seed,
                         at::Tensor dq, at::Tensor dk, at::Tensor dv, at::Tensor dbias) {
  backward_terms(q, k, v, lse, gp, go, crow, col, order, tcrow, trow, ebias, ebias_t, c10::nullopt, c10::nullopt,
                 false, mask, b, h0, heads, scale, dropout_p, seed, dq, dk, dv, dbias);
}

// Window attention's backward: lse is the window log-sum-exp of window_attention_forward, sbias / sbias_t the
// bias values [n, 1 or heads] in entry and transposed order (or none).
void window_attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
                               const at::Tensor& gp, const at::Tensor& go, const at::Tensor& crow,
                               const at::Tensor& col, const at::Tensor& order, const at::Tensor& tcrow,
                               const at::Tensor& trow, const c10::optional<at::Tensor>& sbias,
                               const c10::optional<at::Tensor>& sbias_t, const c10::optional<at::Tensor>& mask,
                               int64_t b, int64_t h0, int64_t heads, double scale, double dropout_p, int64_t seed,
                               at::Tensor dq, at::Tensor dk, at::Tensor dv, at::Tensor dbias) {
  const at::Tensor unused = at::zeros({1, 1}, dq.options());
  backward_terms(q, k, v, lse, gp, go, crow, col, order, tcrow, trow, unused, unused, sbias, sbias_t, true, mask, b,
                 h0, heads, scale, dropout_p, seed, dq, dk, dv, dbias);
}

// Window attention (the local attention mask): out [heads, Q, D] and the window log-sum-exp lse [heads, Q] of
// batch element b; sbias = the bias values [n, 1 or heads] added to the scores, or none.
void window_attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& crow,
                       const at::Tensor& col, const at::Tensor& order, const c10::optional<at::Tensor>& sbias,
                       const c10::optional<at::Tensor>& mask, int64_t b, int64_t h0, int64_t heads, double scale,
                       double dropout_p, int64_t seed, at::Tensor lse, at::Tensor out) {
  const Common c = make_common(q, k, b, h0, heads, scale, dropout_p, seed);
  check_rows(v, "v");
  TORCH_CHECK(lse.is_contiguous() && out.is_contiguous(), "lse and out must be contiguous");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "window_attention_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    switch (c.d) {
      case 32: attn_forward_impl<32, scalar_t, acc_t>(q, k, v, crow, col, order, sbias, mask, c, lse, out); break;
      case 64: attn_forward_impl<64, scalar_t, acc_t>(q, k, v, crow, col, order, sbias, mask, c, lse, out); break;
      default: attn_forward_impl<0, scalar_t, acc_t>(q, k, v, crow, col, order, sbias, mask, c, lse, out);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "sparse_bias fused CPU kernels: the window terms of the exact correction, and the dense pass with dropout";
  m.def("correction_forward", &correction_forward,
        "the correction's window terms of the forward (one batch element, a block of heads)");
  m.def("correction_backward", &correction_backward,
        "the correction's window terms of the backward (one batch element, a block of heads)");
  m.def("window_attention_forward", &window_attention_forward,
        "window attention's forward (one batch element, a block of heads)");
  m.def("window_attention_backward", &window_attention_backward,
        "window attention's backward (one batch element, a block of heads)");
  m.def("dense_forward", &sparse_bias::dense_forward, "flash-style dense attention with counter-hash dropout: (out, lse)");
  m.def("dense_backward", &sparse_bias::dense_backward, "backward of dense_forward: (dq, dk, dv)");
  m.def("parallel_calls", [] { return sparse_bias::parallel_call_count.load(); },
        "the kernel calls that ran on more than one thread since the module loaded (small calls run on the "
        "calling thread)");
  m.def("work_grain", &sparse_bias::work_grain, "the grain (items per thread at least) for n items of `work` "
        "multiply-adds in all");
  m.attr("MIN_WORK_PER_THREAD") = sparse_bias::kMinWorkPerThread;
  m.def("serial_begin", &sparse_bias::serial_begin, "run the calling thread's parallel regions (torch's operators, "
        "MKL's and these kernels') on one thread; returns what serial_end restores");
  m.def("serial_end", &sparse_bias::serial_end, "give the calling thread back the thread counts serial_begin changed");
}
