// The CPU kernels' vector width, chosen once per call at run time.
//
// A CPU hot loop holds N tokens (or N columns) in one Lanes<T, N> vector whose size is this width
// in bytes: 64 where the CPU has AVX-512 (one zmm register per vector), else 32 (one ymm on AVX2;
// two xmm on a baseline x86-64). The ISA clones (PPF_CPU_CLONES) pick the instructions; the
// width is a separate, compile-time template argument of the loop, because a loop written for
// 64-byte vectors spills on AVX2: its 16 x 16 transposing tiles need 32 registers of 256 bits
// (bench/NOTES.md "sparse on AVX2": 2-3x slower than the same loop with 32-byte vectors).
//
// PYPEFT_FAST_CPU_VECTOR_BYTES=32|64 forces a width (the tests run both on any machine: every
// width is correct everywhere, only its speed depends on the ISA; reductions over tokens sum in
// a width-dependent order, so results agree to rounding, not bit for bit, across widths).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace pypeft_fast {

template <int VB>
using Width = std::integral_constant<int, VB>;

inline bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return has;
#else
  return false;
#endif
}

// 64 or 32 (header comment); the environment override is read on every call (a getenv, next to
// kernels of milliseconds) so that a test can switch it.
inline int cpu_vector_bytes() {
  const char* forced = std::getenv("PYPEFT_FAST_CPU_VECTOR_BYTES");
  if (forced != nullptr && forced[0] != '\0') {
    TORCH_CHECK(std::strcmp(forced, "32") == 0 || std::strcmp(forced, "64") == 0,
                "PYPEFT_FAST_CPU_VECTOR_BYTES must be 32 or 64, got '", forced, "'");
    return forced[0] == '6' ? 64 : 32;
  }
  return cpu_has_avx512() ? 64 : 32;
}

// f(Width<64>{}) or f(Width<32>{}): the launcher's body instantiated for both widths, run with
// the CPU's.
template <typename F>
inline void with_cpu_width(F&& f) {
  if (cpu_vector_bytes() == 64)
    f(Width<64>{});
  else
    f(Width<32>{});
}

}  // namespace pypeft_fast
