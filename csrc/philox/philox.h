// Philox4x32-10 dropout masks: bit-for-bit the definition in pypeft_fast/philox.py.
//
//   e       = i * in + j                       row-major index of x[i, j] in the (n, in) view
//   g       = e >> 3                           one Philox call per 8 elements
//   r0..r3  = Philox4x32-10(key = (seed lo32, seed hi32), counter = (g lo32, g hi32, 0, 0))
//   u16     = (r[(e >> 1) & 3] >> (16 * (e & 1))) & 0xffff
//   keep    = u16 >= threshold,   threshold = round(p * 65536)
//
// Everything here is a PPF_HD body: the CPU mask generator (philox_cpu.cpp) and the CUDA launcher
// (philox_cuda.cuh), used by the Philox ops and by csrc/lowrank/, call these same functions.
#pragma once

#include "../common/macros.h"

namespace pypeft_fast {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int kElementsPerCall = 8;  // 128 random bits, 16 per element

struct PhiloxKey {
  uint32_t k0, k1;
};

PPF_HD PhiloxKey philox_key(uint64_t seed) {
  return PhiloxKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// Random123's philox4x32 with R = 10 rounds; counter words 2 and 3 are zero here, but the
// function takes all four so that the known-answer vectors can be checked.
PPF_HD void philox4x32_10(uint32_t c[4], PhiloxKey key) {
  uint32_t k0 = key.k0, k1 = key.k1;
  PPF_UNROLL
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(c[0]) * kPhiloxM0;
    const uint64_t p1 = static_cast<uint64_t>(c[2]) * kPhiloxM1;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(p1);
    c[3] = static_cast<uint32_t>(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

PPF_HD uint32_t keep_threshold(double p) {
  // round-half-even like Python's round(); p * 65536 is exact for the p that matter.
  const double t = p * 65536.0;
  double f = static_cast<double>(static_cast<int64_t>(t));
  const double frac = t - f;
  if (frac > 0.5 || (frac == 0.5 && (static_cast<int64_t>(f) & 1))) f += 1.0;
  return static_cast<uint32_t>(f);
}

// The 8 keep bits of Philox call g: bit j is element 8*g + j.
PPF_HD uint32_t philox_keep8(uint64_t g, PhiloxKey key, uint32_t threshold) {
  uint32_t c[4] = {static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32), 0u, 0u};
  philox4x32_10(c, key);
  uint32_t bits = 0;
  PPF_UNROLL
  for (int w = 0; w < 4; ++w) {
    bits |= static_cast<uint32_t>((c[w] & 0xffffu) >= threshold) << (2 * w);
    bits |= static_cast<uint32_t>((c[w] >> 16) >= threshold) << (2 * w + 1);
  }
  return bits;
}

// Keep decision of one element e (used where a kernel touches single elements).
PPF_HD bool philox_keep(uint64_t e, PhiloxKey key, uint32_t threshold) {
  return (philox_keep8(e >> 3, key, threshold) >> (e & 7)) & 1u;
}

// Dropout of the elements [8g, 8g+8) ∩ [begin, end) of a flat range:
// store(e, keep ? load(e) * scale : 0). One Philox call per group, shared by CPU and GPU.
template <typename T, typename Load, typename Store>
PPF_HD void dropout_group(uint64_t g, int64_t begin, int64_t end, PhiloxKey key,
                          uint32_t threshold, T scale, Load load, Store store) {
  const uint32_t bits = philox_keep8(g, key, threshold);
  const int64_t e0 = static_cast<int64_t>(g) * kElementsPerCall;
  PPF_UNROLL
  for (int j = 0; j < kElementsPerCall; ++j) {
    const int64_t e = e0 + j;
    if (e >= begin && e < end) store(e, ((bits >> j) & 1u) ? load(e) * scale : T(0) * load(e));
  }
}

}  // namespace pypeft_fast
