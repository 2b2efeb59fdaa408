// Portability macros shared by the CPU (.cpp) and CUDA (.cu) translation units.
#pragma once

#include <cstdint>

// PPF_HD marks a per-element / per-thread body compiled for both the host (CPU launchers)
// and the device (CUDA launchers): the code the CPU tests execute is the code the GPU runs.
#if defined(__CUDACC__)
#define PPF_HD __host__ __device__ __forceinline__
#define PPF_UNROLL _Pragma("unroll")
#else
#define PPF_HD inline __attribute__((always_inline))
#define PPF_UNROLL _Pragma("GCC unroll 16")
#endif

// Force-inlined host helper: what a PPF_CPU_CLONES function calls must inline into it, or it
// runs at the default ISA level.
#define PPF_INLINE inline __attribute__((always_inline))

// CPU hot loops are compiled once per x86 ISA level and picked at load time by the ifunc
// resolver (GCC target_clones): the wheel runs on any x86-64, and uses AVX-512 where it exists.
// Only for plain (non-template, non-inline) functions in .cpp files.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(PPF_NO_CLONES)
#define PPF_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PPF_CPU_CLONES
#endif

// A CPU row loop written once as a template fn<acc_t, x_t> (accumulation dtype, activation dtype),
// compiled per ISA: one PPF_CPU_CLONES symbol fn_<sfx> per dtype pair and an overload fn_isa on
// the argument types that calls it. PARAMS is a function-like macro, PARAMS(acc_t, x_t) → the
// parenthesised parameter list; ARGS the parenthesised argument names. For .cpp files.
#define PPF_PAIR_CLONE(fn, acc_t, x_t, sfx, PARAMS, ARGS)                     \
  PPF_CPU_CLONES void fn##_##sfx PARAMS(acc_t, x_t) { fn<acc_t, x_t> ARGS; } \
  inline void fn##_isa PARAMS(acc_t, x_t) { fn##_##sfx ARGS; }

// Every pair the launchers' AT_DISPATCH nests instantiate: acc float/double × x float, double,
// bfloat16, half (needs c10/util/BFloat16.h and Half.h).
#define PPF_ACC_X_CLONES(fn, PARAMS, ARGS)                              \
  PPF_PAIR_CLONE(fn, float, float, f32_f32, PARAMS, ARGS)               \
  PPF_PAIR_CLONE(fn, float, double, f32_f64, PARAMS, ARGS)              \
  PPF_PAIR_CLONE(fn, float, c10::BFloat16, f32_bf16, PARAMS, ARGS)      \
  PPF_PAIR_CLONE(fn, float, c10::Half, f32_f16, PARAMS, ARGS)           \
  PPF_PAIR_CLONE(fn, double, float, f64_f32, PARAMS, ARGS)              \
  PPF_PAIR_CLONE(fn, double, double, f64_f64, PARAMS, ARGS)             \
  PPF_PAIR_CLONE(fn, double, c10::BFloat16, f64_bf16, PARAMS, ARGS)     \
  PPF_PAIR_CLONE(fn, double, c10::Half, f64_f16, PARAMS, ARGS)
