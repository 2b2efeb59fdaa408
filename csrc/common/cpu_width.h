// The CPU kernels' vector width, chosen once per call at run time.
//
// A CPU hot loop holds N tokens (or N columns) in one Lanes<T, N> vector whose size is this width
// in bytes: 64 where the CPU has AVX-512 (one zmm register per vector), else 32 (one ymm on AVX2;
// two xmm on a baseline x86-64). The ISA clones (PPF_CPU_CLONES) pick the instructions; the
// width is a separate, compile-time template argument of the loop, because a loop written for
// 64-byte vectors spills on AVX2: its 16 x 16 transposing tiles need 32 registers of 256 bits
// (bench/NOTES.md "sparse on AVX2": 2-3x slower than the same loop with 32-byte vectors).
//
// PYPEFT_FAST_CPU_VECTOR_BYTES=16|32|64 forces a width (the tests run every one on any machine:
// each Lanes width is correct everywhere, only its speed depends on the ISA; reductions over
// tokens sum in a width-dependent order, so results agree to rounding, not bit for bit, across
// widths). The same setting caps the hand-written intrinsics variants (the Philox rounds:
// AVX-512, AVX2, portable), which must stay bit-identical: 16 selects the portable code.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "macros.h"

namespace pypeft_fast {

template <int VB>
using Width = std::integral_constant<int, VB>;

// The widest vector the CPU's ISA has, in bytes: 64 (AVX-512 F/BW/VL/DQ), 32 (AVX2 + FMA), 16.
inline int cpu_native_vector_bytes() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const int bytes = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return 64;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 32 : 16;
  }();
  return bytes;
#else
  return 16;
#endif
}

// The forced width, 0 when none; read on every call (a getenv, next to kernels of milliseconds)
// so that a test can switch it.
inline int forced_vector_bytes() {
  const char* forced = std::getenv("PYPEFT_FAST_CPU_VECTOR_BYTES");
  if (forced == nullptr || forced[0] == '\0') return 0;
  const bool ok = std::strcmp(forced, "16") == 0 || std::strcmp(forced, "32") == 0 ||
                  std::strcmp(forced, "64") == 0;
  TORCH_CHECK(ok, "PYPEFT_FAST_CPU_VECTOR_BYTES must be 16, 32 or 64, got '", forced, "'");
  return std::atoi(forced);
}

// The Lanes loops' width: 64 with AVX-512, else 32 (no loop is instantiated for 16 bytes: a
// baseline x86-64 runs the 32-byte loops as pairs of 16-byte registers).
inline int cpu_vector_bytes() {
  const int forced = forced_vector_bytes();
  return (forced ? forced : cpu_native_vector_bytes()) == 64 ? 64 : 32;
}

// The widest intrinsics variant to run: the CPU's, capped by the forced width.
inline int cpu_isa_vector_bytes() {
  const int forced = forced_vector_bytes();
  return forced ? std::min(forced, cpu_native_vector_bytes()) : cpu_native_vector_bytes();
}

#define PPF_EXPAND(...) __VA_ARGS__

// One hot loop at one width: the ISA-cloned plain function `clone` PARAMS (PPF_CPU_CLONES needs a
// non-template symbol) whose body is `impl ARGS`, and the overload `dispatch(Width<VB>, PARAMS)`
// that a launcher's with_cpu_width body calls. `impl` comes parenthesised (its template
// arguments hold commas), e.g. (spmm_block<float, 8>).
#define PPF_WIDTH_CLONE(VB, clone, dispatch, PARAMS, ARGS, impl)             \
  PPF_CPU_CLONES void clone PARAMS { impl ARGS; }                           \
  namespace {                                                               \
  inline void dispatch(Width<VB>, PPF_EXPAND PARAMS) { clone ARGS; }        \
  }  // namespace

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
