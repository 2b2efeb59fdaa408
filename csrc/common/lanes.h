// Lanes<T, N>: N values of T as one GCC vector, the CPU stand-in for "one value per thread".
//
// A PPF_HD body templated on its value type runs with T (one token per CUDA thread) on the GPU
// and with Lanes<T, N> (a block of N tokens) on the CPU: the same arithmetic, N tokens at a
// time, compiled to AVX-512 / AVX2 / SSE2 by the clone the CPU dispatches to.
#pragma once

#include <cstring>
#include <utility>

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
  // The M-lane vector whose lane i is the sum of lanes i, i+M, i+2M, ... (vector adds only).
  template <int M>
  PPF_HD Lanes<T, M> fold() const {
    static_assert(N % M == 0, "fold<M>: M must divide N");
    typename Lanes<T, M>::V parts[N / M];
    std::memcpy(parts, &v, sizeof(V));
    PPF_UNROLL
    for (int w = N / M / 2; w >= 1; w /= 2) {
      PPF_UNROLL
      for (int i = 0; i < w; ++i) parts[i] += parts[i + w];
    }
    return Lanes<T, M>::of(parts[0]);
  }
  friend PPF_HD Lanes operator+(Lanes a, Lanes b) { return of(a.v + b.v); }
  friend PPF_HD Lanes operator*(Lanes a, Lanes b) { return of(a.v * b.v); }
  friend PPF_HD Lanes operator*(Lanes a, T s) { return of(a.v * s); }
  friend PPF_HD Lanes operator*(T s, Lanes a) { return of(a.v * s); }
};

// G vectors of N lanes that a body treats as one value of G*N lanes (the +, * and load/store a
// T body uses). Where G*N lanes are wider than a register, GCC keeps a loop-carried Lanes<T, G*N>
// on the stack; G separate members stay in G registers.
template <typename T, int N, int G>
struct LaneGroup {
  Lanes<T, N> part[G];

  PPF_HD LaneGroup() {}
  PPF_HD LaneGroup(T s) {  // broadcast
    PPF_UNROLL
    for (int g = 0; g < G; ++g) part[g] = Lanes<T, N>(s);
  }
  static PPF_HD LaneGroup load(const T* p) {
    LaneGroup r;
    PPF_UNROLL
    for (int g = 0; g < G; ++g) r.part[g] = Lanes<T, N>::load(p + g * N);
    return r;
  }
  PPF_HD void store(T* p) const {
    PPF_UNROLL
    for (int g = 0; g < G; ++g) part[g].store(p + g * N);
  }
  friend PPF_HD LaneGroup operator+(const LaneGroup& a, const LaneGroup& b) {
    LaneGroup r;
    PPF_UNROLL
    for (int g = 0; g < G; ++g) r.part[g] = a.part[g] + b.part[g];
    return r;
  }
  friend PPF_HD LaneGroup operator*(const LaneGroup& a, T s) {
    LaneGroup r;
    PPF_UNROLL
    for (int g = 0; g < G; ++g) r.part[g] = a.part[g] * s;
    return r;
  }
};

namespace detail {
// Stage B of an N x N transpose: swap bit B of the row index with bit B of the column index.
template <int B, typename V, size_t... J>
PPF_INLINE V swap_lo(V a, V b, std::index_sequence<J...>) {
  constexpr int N = sizeof...(J);
  return __builtin_shufflevector(a, b, ((J & B) ? (N + J - B) : J)...);
}
template <int B, typename V, size_t... J>
PPF_INLINE V swap_hi(V a, V b, std::index_sequence<J...>) {
  constexpr int N = sizeof...(J);
  return __builtin_shufflevector(a, b, ((J & B) ? (N + J) : (J + B))...);
}
template <int B, typename V, int N>
PPF_INLINE void transpose_stage(V* r) {
  PPF_UNROLL
  for (int i = 0; i < N; ++i) {
    if (i & B) continue;
    const V lo = swap_lo<B>(r[i], r[i + B], std::make_index_sequence<N>{});
    const V hi = swap_hi<B>(r[i], r[i + B], std::make_index_sequence<N>{});
    r[i] = lo;
    r[i + B] = hi;
  }
}
}  // namespace detail

// In-register transpose of the N x N tile r[0..N) (row i = r[i]): log2(N) shuffle stages.
template <typename T, int N>
PPF_INLINE void transpose_square(Lanes<T, N>* r) {
  using V = typename Lanes<T, N>::V;
  V* v = reinterpret_cast<V*>(r);
  if constexpr (N >= 2) detail::transpose_stage<1, V, N>(v);
  if constexpr (N >= 4) detail::transpose_stage<2, V, N>(v);
  if constexpr (N >= 8) detail::transpose_stage<4, V, N>(v);
  if constexpr (N >= 16) detail::transpose_stage<8, V, N>(v);
  static_assert(N <= 16, "transpose_square: N <= 16");
}

namespace detail {
// Pair sums within 16-byte granules: granule g of the result is
// [a[g,0]+a[g,1], a[g,2]+a[g,3], ..., b[g,0]+b[g,1], ...] (vshufps / unpck{l,h}pd on x86).
template <int L, typename V, size_t... J>
PPF_INLINE V granule_pair_sums(V a, V b, std::index_sequence<J...>) {
  constexpr int N = sizeof...(J);
  return __builtin_shufflevector(
             a, b, (((J % L) < L / 2 ? 0 : N) + (J / L) * L + 2 * ((J % L) % (L / 2)))...) +
         __builtin_shufflevector(
             a, b, (((J % L) < L / 2 ? 0 : N) + (J / L) * L + 2 * ((J % L) % (L / 2)) + 1)...);
}
// Pair sums of whole granules: granule G of the result is a's granules 2G + 2G+1 summed for
// G < NG/2, b's after (vperm2f128 / vshuff32x4 on x86).
template <int L, typename V, size_t... J>
PPF_INLINE V cross_pair_sums(V a, V b, std::index_sequence<J...>) {
  constexpr int N = sizeof...(J), NG = N / L;
  return __builtin_shufflevector(
             a, b, (((J / L) < NG / 2 ? 0 : N) + 2 * ((J / L) % (NG / 2)) * L + J % L)...) +
         __builtin_shufflevector(
             a, b, (((J / L) < NG / 2 ? 0 : N) + (2 * ((J / L) % (NG / 2)) + 1) * L + J % L)...);
}
template <int L, int M, typename V, int N>
PPF_INLINE void granule_level(V* buf) {  // M vectors -> M / 2
  PPF_UNROLL
  for (int i = 0; i < M / 2; ++i)
    buf[i] = granule_pair_sums<L>(buf[2 * i], buf[2 * i + 1], std::make_index_sequence<N>{});
}
template <int L, int M, typename V, int N>
PPF_INLINE void cross_level(V* buf) {
  PPF_UNROLL
  for (int i = 0; i < M / 2; ++i)
    buf[i] = cross_pair_sums<L>(buf[2 * i], buf[2 * i + 1], std::make_index_sequence<N>{});
}
}  // namespace detail

// sums[j] = v[j].sum() for the N vectors v[0..N) (the SDDMM reduction of one product vector per
// stored entry): log2(N) levels of pair sums instead of N horizontal sums, first inside 16-byte
// granules (shuffles that stay in a 128-bit lane), then across granules (on AVX2 one level of
// vperm2f128). Cross-lane shuffles at every level made the whole SDDMM 7-12 % slower
// (bench/NOTES.md "SDDMM's lane sums").
template <typename T, int N>
PPF_INLINE Lanes<T, N> transpose_sum(const Lanes<T, N>* v) {
  using V = typename Lanes<T, N>::V;
  constexpr int L0 = 16 / static_cast<int>(sizeof(T));
  constexpr int L = L0 < N ? L0 : N;
  V buf[N];
  for (int i = 0; i < N; ++i) buf[i] = v[i].v;
  if constexpr (L >= 2) { detail::granule_level<L, N, V, N>(buf); }
  if constexpr (L >= 4) { detail::granule_level<L, N / 2, V, N>(buf); }
  static_assert(L <= 4, "transpose_sum: at most 4 values per granule");
  constexpr int after = N / L;  // vectors left, each holding L sums per granule
  if constexpr (after >= 2) detail::cross_level<L, after, V, N>(buf);
  if constexpr (after >= 4) detail::cross_level<L, after / 2, V, N>(buf);
  if constexpr (after >= 8) detail::cross_level<L, after / 4, V, N>(buf);
  static_assert(after <= 8, "transpose_sum: N / L <= 8");
  return Lanes<T, N>::of(buf[0]);
}

}  // namespace pypeft_fast
