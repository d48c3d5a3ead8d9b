// The counter-based attention-dropout hash of sparse_bias.kernels.dropout_keep, bit for bit, shared by the kernels.
#pragma once
#include <cstdint>

namespace sparse_bias {

inline uint64_t hash32(uint64_t x) {
  x = (((x >> 16) ^ x) * 0x45D9F3BULL) & 0xFFFFFFFFULL;
  x = (((x >> 16) ^ x) * 0x45D9F3BULL) & 0xFFFFFFFFULL;
  return (x >> 16) ^ x;
}

// The two 32-bit keys of a seed (sparse_bias.kernels.seed_keys): its halves, each mixed once.
inline uint64_t seed_key_lo(uint64_t seed) { return hash32((seed & 0xFFFFFFFFULL) ^ 0x9E3779B9ULL); }
inline uint64_t seed_key_hi(uint64_t seed) { return hash32((seed >> 32) ^ 0x7F4A7C15ULL); }

// Whether the score at flat index `flat` of the [B, H, Q, K] score tensor is kept (probability 1 - p).
inline bool keep_entry(uint64_t seed, uint64_t flat, double p) {
  uint64_t h = hash32((flat & 0xFFFFFFFFULL) ^ seed_key_lo(seed));
  h = hash32(h ^ (flat >> 32) ^ seed_key_hi(seed));
  const float uniform = static_cast<float>(h & 0xFFFFFF) * (1.0f / 16777216.0f);
  return uniform >= static_cast<float>(p);
}

// The same decision in 32-bit lanes (the compiler vectorises loops of it): `lo` / `hi` are the low / high
// 32 bits of the flat index, `seed_lo` / `seed_hi` the seed's keys (seed_key_lo / seed_key_hi).
inline uint32_t hash32_u32(uint32_t x) {
  x = ((x >> 16) ^ x) * 0x45D9F3BU;
  x = ((x >> 16) ^ x) * 0x45D9F3BU;
  return (x >> 16) ^ x;
}

inline float keep_uniform(uint32_t lo, uint32_t hi, uint32_t seed_lo, uint32_t seed_hi) {
  const uint32_t h = hash32_u32(hash32_u32(lo ^ seed_lo) ^ hi ^ seed_hi);
  return static_cast<float>(h & 0xFFFFFFU) * (1.0f / 16777216.0f);
}

}  // namespace sparse_bias
