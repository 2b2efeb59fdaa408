// The CPU Philox dropout multipliers, shared by the Philox ops (philox_cpu.cpp) and the fused
// low-rank dropout path (csrc/lowrank/lowrank_cpu.cpp): mult_range fills a thread-local buffer
// with scale-or-0 per element of a flat range, a block at a time, so that the consumer reads it
// while it is hot. The Philox loop itself (dropout_mult_f32/f64) is compiled per ISA
// (PPF_CPU_CLONES) in philox_cpu.cpp, with an AVX-512 variant picked at run time.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "philox.h"

namespace pypeft_fast {

constexpr int kPhiloxLanes = 16;  // Philox calls computed side by side (one AVX-512 vector of counters)

// out[8*i + j] = keep(8*(g0+i) + j) ? scale : 0 for i < ngroups; out holds at least
// (ngroups + kPhiloxLanes) * kElementsPerCall values. Defined in philox_cpu.cpp (ISA clones).
void dropout_mult_f32(uint64_t g0, int64_t ngroups, PhiloxKey key, uint32_t thr, float scale,
                      float* out);
void dropout_mult_f64(uint64_t g0, int64_t ngroups, PhiloxKey key, uint32_t thr, double scale,
                      double* out);

inline void dropout_mult_isa(uint64_t g0, int64_t ng, PhiloxKey k, uint32_t t, float s, float* o) {
  dropout_mult_f32(g0, ng, k, t, s, o);
}
inline void dropout_mult_isa(uint64_t g0, int64_t ng, PhiloxKey k, uint32_t t, double s, double* o) {
  dropout_mult_f64(g0, ng, k, t, s, o);
}

// Uninitialised, growable scratch memory (a std::vector would zero-fill it on every resize).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  size_t size = 0;
  T* get(size_t n) {
    if (n > size) {
      p.reset(new T[n]);
      size = n;
    }
    return p.get();
  }
};

// Multipliers of the flat elements [e0, e0 + count): returns a pointer m with m[i] the
// multiplier of element e0 + i (generated from e0's Philox group on).
template <typename T>
inline const T* mult_range(int64_t e0, int64_t count, PhiloxKey key, uint32_t thr, T scale,
                           Scratch<T>& buf) {
  const int64_t g0 = e0 / kElementsPerCall;
  const int64_t g1 = (e0 + count + kElementsPerCall - 1) / kElementsPerCall;
  T* m = buf.get(static_cast<size_t>((g1 - g0 + kPhiloxLanes) * kElementsPerCall));
  dropout_mult_isa(static_cast<uint64_t>(g0), g1 - g0, key, thr, scale, m);
  return m + (e0 - g0 * kElementsPerCall);
}

// The dropout scale 1/(1-p) as torch applies it to a tensor of dtype T (float32 rounds it).
template <typename T>
inline T dropout_scale(double p) { return static_cast<T>(1.0 / (1.0 - p)); }

inline uint64_t seed_value(const at::Tensor& seed) {
  return static_cast<uint64_t>(seed.item<int64_t>());
}

}  // namespace pypeft_fast
