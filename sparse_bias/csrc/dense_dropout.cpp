// Flash-style dense attention with the counter-hash attention dropout, forward and backward (CPU).
//
// The forward walks blocks of keys with the online softmax: per (batch, head, block of queries), scores of a
// key block come from one GEMM, the row maximum / sum update the running statistics, the keep decision of
// every probability is hashed from its flat index inside that same loop (never stored), and one GEMM adds
// the kept probabilities times the values. It returns the log-sum-exp of the undropped scores, as the
// chunked PyTorch kernel does. The backward runs per (batch, head) -- the one thread that owns a head writes
// its dq, dk and dv, so results are deterministic -- recomputing the probabilities block by block from the
// log-sum-exp and hashing the same decisions. GEMMs are ATen's (MKL / oneDNN); elementwise work is
// vectorised loops. Arithmetic in float32 (float64 for float64 input).
#include "dense_dropout.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "dropout_hash.h"
#include "mask.h"
#include "parallel.h"
#include "vec_math.h"

namespace sparse_bias {
namespace {

constexpr int64_t kBlockQ = 256;   // queries per block
constexpr int64_t kBlockK = 512;   // keys per block

struct Dropout {
  double p = 0;
  uint32_t seed_lo = 0, seed_hi = 0;
  uint64_t heads = 1, nq = 1, total = 1, offset = 0;
  // flat index of score (b, h, q, key) of the full [B, H, Q, total] tensor
  inline uint64_t flat(uint64_t b, uint64_t h, uint64_t q, uint64_t key) const {
    return ((b * heads + h) * nq + q) * total + offset + key;
  }
};

// z[j] = keep(flat0 + j) / (1 - p) for j < n
template <typename acc_t>
inline void keep_row(const Dropout& dr, uint64_t flat0, int64_t n, acc_t* z) {
  const float pf = static_cast<float>(dr.p);
  const acc_t inv = acc_t(1) / static_cast<acc_t>(1 - dr.p);
  if ((flat0 >> 32) == ((flat0 + n) >> 32)) {       // one high word: the vectorisable loop
    const uint32_t lo0 = static_cast<uint32_t>(flat0), hi = static_cast<uint32_t>(flat0 >> 32);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float u = keep_uniform(lo0 + static_cast<uint32_t>(j), hi, dr.seed_lo, dr.seed_hi);
      z[j] = u >= pf ? inv : acc_t(0);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const uint64_t f = flat0 + j;
      const float u = keep_uniform(static_cast<uint32_t>(f), static_cast<uint32_t>(f >> 32), dr.seed_lo, dr.seed_hi);
      z[j] = u >= pf ? inv : acc_t(0);
    }
  }
}

Dropout make_dropout(double p, int64_t seed, int64_t heads, int64_t nq, int64_t total, int64_t offset) {
  Dropout d;
  d.p = p;
  d.seed_lo = static_cast<uint32_t>(seed_key_lo(static_cast<uint64_t>(seed)));
  d.seed_hi = static_cast<uint32_t>(seed_key_hi(static_cast<uint64_t>(seed)));
  d.heads = heads;
  d.nq = nq;
  d.total = total;
  d.offset = offset;
  return d;
}

at::Tensor prepared_mask(const c10::optional<at::Tensor>& mask, at::ScalarType acc) {
  if (!mask.has_value() || !mask->defined()) return at::Tensor();
  TORCH_CHECK(mask->dim() == 4, "mask must be 4-D (broadcastable to [B, H, Q, K])");
  return mask->detach().to(acc);
}

template <typename acc_t>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask_t,
                  acc_t scale, const Dropout& dr, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), K = k.size(2), D = q.size(3);
  const int64_t nqb = (Q + kBlockQ - 1) / kBlockQ;
  const Mask<acc_t> M(mask_t);
  const bool drop = dr.p > 0;
  const auto opts = q.options();
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const double work = 2.0 * B * H * Q * K * D;         // two GEMMs: scores and probabilities times values
  parallel_items(B * H * nqb, work, [&](int64_t t0, int64_t t1) {
    at::NoGradGuard no_grad;                            // grad mode is per thread: worker threads too
    at::Tensor S = at::empty({kBlockQ * kBlockK}, opts), acc = at::empty({kBlockQ, D}, opts);
    std::vector<acc_t> m(kBlockQ), l(kBlockQ), z(drop ? kBlockK : 0);
    acc_t* sp = S.data_ptr<acc_t>();
    acc_t* ap = acc.data_ptr<acc_t>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t bh = t / nqb, b = bh / H, h = bh % H, q0 = (t % nqb) * kBlockQ;
      const int64_t nq = std::min(kBlockQ, Q - q0);
      const at::Tensor qb = q[b][h].narrow(0, q0, nq), kh = k[b][h], vh = v[b][h];
      at::Tensor accb = acc.narrow(0, 0, nq);
      accb.zero_();
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), acc_t(0));
      for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, K - k0);
        at::Tensor s = at::from_blob(sp, {nq, nk}, opts);
        at::mm_out(s, qb, kh.narrow(0, k0, nk).t());
        for (int64_t i = 0; i < nq; ++i) {
          acc_t* row = sp + i * nk;
          const acc_t* mrow = M.row(b, h, q0 + i, k0);
          acc_t mx = ninf;
          if (mrow) {
            for (int64_t j = 0; j < nk; ++j) {
              row[j] = row[j] * scale + mrow[j * M.sk];
              mx = std::max(mx, row[j]);
            }
          } else {
#pragma omp simd reduction(max : mx)
            for (int64_t j = 0; j < nk; ++j) {
              row[j] *= scale;
              mx = std::max(mx, row[j]);
            }
          }
          acc_t m_new = std::max(m[i], mx);
          acc_t* arow = ap + i * D;
          if (m_new == ninf) {
            if (!any_nan(row, nk)) {                   // every key so far masked: nothing to add
              std::fill(row, row + nk, acc_t(0));
              continue;
            }
            m_new = std::numeric_limits<acc_t>::quiet_NaN();   // NaN scores: a NaN row, as the dense version
          }
          const acc_t corr = std::exp(m[i] - m_new);
          acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < nk; ++j) {
            row[j] = vexp(row[j] - m_new);
            sum += row[j];
          }
          l[i] = l[i] * corr + sum;
          m[i] = m_new;
          if (corr != acc_t(1))
            for (int64_t d = 0; d < D; ++d) arow[d] *= corr;
          if (drop) {
            keep_row(dr, dr.flat(b, h, q0 + i, k0), nk, z.data());
#pragma omp simd
            for (int64_t j = 0; j < nk; ++j) row[j] *= z[j];
          }
        }
        accb.addmm_(s, vh.narrow(0, k0, nk));
      }
      acc_t* op = out[b][h].data_ptr<acc_t>() + q0 * D;
      acc_t* lp = lse[b][h].data_ptr<acc_t>() + q0;
      for (int64_t i = 0; i < nq; ++i) {
        const acc_t inv = l[i] == 0 ? acc_t(0) : acc_t(1) / l[i];   // a fully masked row: zeros (conventions.md)
        for (int64_t d = 0; d < D; ++d) op[i * D + d] = ap[i * D + d] * inv;
        lp[i] = m[i] + std::log(l[i]);
      }
    }
  });
}

template <typename acc_t>
void backward_impl(const at::Tensor& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& delta, const at::Tensor& lse, const at::Tensor& mask_t, acc_t scale,
                   const Dropout& dr, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), K = k.size(2), D = q.size(3);
  const Mask<acc_t> M(mask_t);
  const bool drop = dr.p > 0;
  const auto opts = q.options();
  const double work = 5.0 * B * H * Q * K * D;         // five GEMMs: scores, <g, v_j>, dv, dq and dk
  parallel_items(B * H, work, [&](int64_t t0, int64_t t1) {
    at::NoGradGuard no_grad;
    at::Tensor P = at::empty({kBlockQ * kBlockK}, opts), dP = at::empty({kBlockQ * kBlockK}, opts);
    std::vector<acc_t> z(drop ? kBlockK : 0);
    acc_t* pp = P.data_ptr<acc_t>();
    acc_t* dpp = dP.data_ptr<acc_t>();
    for (int64_t bh = t0; bh < t1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const at::Tensor qh = q[b][h], kh = k[b][h], vh = v[b][h], gh = g[b][h];
      at::Tensor dqh = dq[b][h], dkh = dk[b][h], dvh = dv[b][h];
      const acc_t* lp = lse[b][h].data_ptr<acc_t>();
      const acc_t* dl = delta[b][h].data_ptr<acc_t>();
      for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, K - k0);
        const at::Tensor kb = kh.narrow(0, k0, nk), vb = vh.narrow(0, k0, nk);
        at::Tensor dkb = dkh.narrow(0, k0, nk), dvb = dvh.narrow(0, k0, nk);
        for (int64_t q0 = 0; q0 < Q; q0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, Q - q0);
          const at::Tensor qb = qh.narrow(0, q0, nq), gb = gh.narrow(0, q0, nq);
          at::Tensor p = at::from_blob(pp, {nq, nk}, opts), dp = at::from_blob(dpp, {nq, nk}, opts);
          at::mm_out(p, qb, kb.t());                    // scores
          at::mm_out(dp, gb, vb.t());                   // <g, v_j>
          for (int64_t i = 0; i < nq; ++i) {
            acc_t* prow = pp + i * nk;
            acc_t* dprow = dpp + i * nk;
            const acc_t* mrow = M.row(b, h, q0 + i, k0);
            const acc_t L = lp[q0 + i], dlt = dl[q0 + i];
            if (mrow) {
              for (int64_t j = 0; j < nk; ++j) prow[j] = vexp(prow[j] * scale + mrow[j * M.sk] - L);
            } else {
#pragma omp simd
              for (int64_t j = 0; j < nk; ++j) prow[j] = vexp(prow[j] * scale - L);
            }
            if (drop) {
              keep_row(dr, dr.flat(b, h, q0 + i, k0), nk, z.data());
#pragma omp simd
              for (int64_t j = 0; j < nk; ++j) {
                const acc_t pj = prow[j];
                dprow[j] = pj * (dprow[j] * z[j] - dlt);   // ds
                prow[j] = pj * z[j];                       // the kept probability (for dv)
              }
            } else {
#pragma omp simd
              for (int64_t j = 0; j < nk; ++j) dprow[j] = prow[j] * (dprow[j] - dlt);
            }
          }
          dvb.addmm_(p.t(), gb);                        // dv_j += p_j keep_j g
          dqh.narrow(0, q0, nq).addmm_(dp, kb, 1, scale);
          dkb.addmm_(dp.t(), qb, 1, scale);
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t key_offset,
                  int64_t total_keys) {
  TORCH_CHECK(q.device().is_cpu(), "dense_forward runs on CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be [B, H, N, D]");
  TORCH_CHECK(key_offset >= 0 && key_offset + k.size(2) <= total_keys, "key range outside total_keys");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const c10::optional<at::Tensor>& mask, double scale,
                                                 double dropout_p, int64_t seed, int64_t key_offset,
                                                 int64_t total_keys) {
  check_inputs(q, k, v, key_offset, total_keys);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor qa = q.detach().to(acc).contiguous(), ka = k.detach().to(acc).contiguous(),
                   va = v.detach().to(acc).contiguous();
  const at::Tensor m = prepared_mask(mask, acc);
  at::Tensor out = at::empty(qa.sizes(), qa.options()), lse = at::empty({q.size(0), q.size(1), q.size(2)}, qa.options());
  const Dropout dr = make_dropout(dropout_p, seed, q.size(1), q.size(2), total_keys, key_offset);
  if (acc == at::kDouble)
    forward_impl<double>(qa, ka, va, m, scale, dr, out, lse);
  else
    forward_impl<float>(qa, ka, va, m, static_cast<float>(scale), dr, out, lse);
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& mask, double scale, double dropout_p, int64_t seed,
    int64_t key_offset, int64_t total_keys) {
  check_inputs(q, k, v, key_offset, total_keys);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor qa = q.detach().to(acc).contiguous(), ka = k.detach().to(acc).contiguous(),
                   va = v.detach().to(acc).contiguous();
  const at::Tensor g = grad_out.detach().to(acc).contiguous();
  const at::Tensor delta = (g * out.detach().to(acc)).sum(-1);               // rowsum(g * out)
  const at::Tensor L = lse.detach().to(acc).contiguous();
  const at::Tensor m = prepared_mask(mask, acc);
  at::Tensor dq = at::zeros(qa.sizes(), qa.options()), dk = at::zeros(ka.sizes(), ka.options()),
             dv = at::zeros(va.sizes(), va.options());
  const Dropout dr = make_dropout(dropout_p, seed, q.size(1), q.size(2), total_keys, key_offset);
  if (acc == at::kDouble)
    backward_impl<double>(g, qa, ka, va, delta, L, m, scale, dr, dq, dk, dv);
  else
    backward_impl<float>(g, qa, ka, va, delta, L, m, static_cast<float>(scale), dr, dq, dk, dv);
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace sparse_bias
