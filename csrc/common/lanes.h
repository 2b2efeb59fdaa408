// Lanes<T, N>: N values of T as one GCC vector, the CPU stand-in for "one value per thread".
//
// A PPF_HD body templated on its value type runs with T (one token per CUDA thread) on the GPU
// and with Lanes<T, N> (a block of N tokens) on the CPU: the same arithmetic, N tokens at a
// time, compiled to AVX-512 / AVX2 / SSE2 by the clone the CPU dispatches to.
#pragma once

#include <cstring>

#include "macros.h"

namespace pypeft_fast {

template <typename T, int N>
struct Lanes {
  static_assert((N & (N - 1)) == 0, "Lanes<T, N>: N must be a power of two");
  typedef T V __attribute__((vector_size(sizeof(T) * N)));
  V v;

  PPF_HD Lanes() : v{} {}
  PPF_HD Lanes(T s) : v(V{} + s) {}  // broadcast (implicit, like a scalar in a T body)

  static PPF_HD Lanes of(V x) {
    Lanes r;
    r.v = x;
    return r;
  }
  static PPF_HD Lanes load(const T* p) {
    Lanes r;
    std::memcpy(&r.v, p, sizeof(V));
    return r;
  }
  PPF_HD void store(T* p) const { std::memcpy(p, &v, sizeof(V)); }
  // Pairwise (tree) sum: log2(N) vector adds, not N dependent scalar adds.
  PPF_HD T sum() const {
    T a[N];
    std::memcpy(a, &v, sizeof(V));
    PPF_UNROLL
    for (int w = N / 2; w >= 1; w /= 2) {
      PPF_UNROLL
      for (int i = 0; i < w; ++i) a[i] += a[i + w];
    }
    return a[0];
  }
  friend PPF_HD Lanes operator+(Lanes a, Lanes b) { return of(a.v + b.v); }
  friend PPF_HD Lanes operator*(Lanes a, Lanes b) { return of(a.v * b.v); }
  friend PPF_HD Lanes operator*(Lanes a, T s) { return of(a.v * s); }
  friend PPF_HD Lanes operator*(T s, Lanes a) { return of(a.v * s); }
};

}  // namespace pypeft_fast
