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
