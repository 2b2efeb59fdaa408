// CPU kernels of skinny_mm.h: skinny_mm (C (n, r) = a·b, a (n, k), b (k, r) a factor's columns)
// and rank_update_acc (out (n, k) (+)= (t·A) ⊙ m).
//
// skinny_mm: a register tile of MR rows of C × NV vectors of its r columns: per step j along k,
// NV vector loads of b's row j and MR broadcasts of a[i, j] for MR·NV FMAs (6 × 2: 15 of AVX2's 16
// registers at 32 bytes; 8 × 1). b is already in the layout a BLAS packs it into, so there is no
// packing. k goes in blocks of kKBlock steps, each block's sum formed from zero in registers and
// added to C once: a running sum over all of k per element had 1.2× MKL's rounding error at
// k = 1024 (2.9e-7 against 2.5e-7); blocks of 64 steps bound it by about (64 + k/64) roundings.
// MKL runs this shape (n × k times k × r) at 12–65 GFLOP/s on one thread of the AVX2 EPYC for
// r = 8–16, against about 90 for the frozen GEMMs (bench/NOTES.md "skinny_mm").
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/cpu_width.h"
#include "../common/lanes.h"
#include "../common/rows.h"
#include "../ops.h"
#include "skinny_mm.h"

namespace pypeft_fast {
namespace {

constexpr int64_t kKBlock = 64;  // steps along k per block: one partial sum from zero (header)

// Rows of C per register tile: 6 × 2 vectors, or 8 × 1 (not 12: twelve rows of a 4 KiB row stride
// map to one set of the 8-way L1 and evict each other every step, 2.2× slower at k = 1024).
template <int NV>
constexpr int rows_per_tile() { return NV == 1 ? 8 : 12 / NV; }

// C[0:MR, 0:NV·lanes(L)] (+)= a[0:MR, 0:kk] · b[0:kk, 0:NV·lanes(L)], the sum formed from zero.
template <int MR, int NV, typename L, typename T>
PPF_INLINE void mm_tile(const T* a, int64_t sa, const T* b, int64_t sb, int64_t kk, T* c,
                        int64_t sc, bool load) {
  constexpr int W = sizeof(typename L::V) / sizeof(T);
  L acc[MR][NV];
  PPF_UNROLL
  for (int i = 0; i < MR; ++i) {
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) acc[i][v] = L(T(0));
  }
  for (int64_t j = 0; j < kk; ++j) {
    const T* bj = b + j * sb;
    L bv[NV];
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = L::load(bj + v * W);
    PPF_UNROLL
    for (int i = 0; i < MR; ++i) {
      const T s = a[i * sa + j];
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] = acc[i][v] + bv[v] * s;
    }
  }
  PPF_UNROLL
  for (int i = 0; i < MR; ++i) {
    PPF_UNROLL
    for (int v = 0; v < NV; ++v)
      (load ? L::load(c + i * sc + v * W) + acc[i][v] : acc[i][v]).store(c + i * sc + v * W);
  }
}

// The last rows - rows % MR of a row range: a tile of exactly that many rows.
template <int M, int NV, typename L, typename T>
PPF_INLINE void mm_tail(int64_t rows, const T* a, int64_t sa, const T* b, int64_t sb, int64_t kk,
                        T* c, int64_t sc, bool load) {
  if constexpr (M > 0) {
    if (rows == M) return mm_tile<M, NV, L>(a, sa, b, sb, kk, c, sc, load);
    mm_tail<M - 1, NV, L>(rows, a, sa, b, sb, kk, c, sc, load);
  }
}

// All rows of one column tile: MR-row tiles, then the remainder.
template <int NV, typename L, typename T>
PPF_INLINE void mm_rows(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t kk,
                        T* c, int64_t sc, bool load) {
  constexpr int MR = rows_per_tile<NV>();
  int64_t i = 0;
  for (; i + MR <= n; i += MR) mm_tile<MR, NV, L>(a + i * sa, sa, b, sb, kk, c + i * sc, sc, load);
  mm_tail<MR - 1, NV, L>(n - i, a + i * sa, sa, b, sb, kk, c + i * sc, sc, load);
}

// The whole product at vector width VB: blocks along k, and per block every column tile (two
// vectors, then one, then half a vector, then single columns for r's tail).
template <typename T, int VB>
PPF_INLINE void mm_block(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t k,
                         int64_t r, T* c, int64_t sc, bool accumulate) {
  constexpr int N = VB / sizeof(T);
  constexpr int NH = N >= 4 ? N / 2 : 1;
  using L = Lanes<T, N>;
  using H = Lanes<T, NH>;
  using S = Lanes<T, 1>;
  if (k == 0 && !accumulate) {
    for (int64_t i = 0; i < n; ++i) std::fill(c + i * sc, c + i * sc + r, T(0));
    return;
  }
  for (int64_t j0 = 0; j0 < k; j0 += kKBlock) {
    const int64_t kk = std::min(kKBlock, k - j0);
    const bool load = accumulate || j0 > 0;
    const T* ab = a + j0;
    const T* bb = b + j0 * sb;
    int64_t q = 0;
    for (; q + 2 * N <= r; q += 2 * N) mm_rows<2, L>(ab, sa, bb + q, sb, n, kk, c + q, sc, load);
    for (; q + N <= r; q += N) mm_rows<1, L>(ab, sa, bb + q, sb, n, kk, c + q, sc, load);
    if constexpr (NH > 1)
      for (; q + NH <= r; q += NH) mm_rows<1, H>(ab, sa, bb + q, sb, n, kk, c + q, sc, load);
    for (; q < r; ++q) mm_rows<1, S>(ab, sa, bb + q, sb, n, kk, c + q, sc, load);
  }
}

// out[0:MR, 0:NV·lanes(L)] = [out +] (t[0:MR, 0:r] · A[0:r, cols]) ⊙ m: the rank-r sum formed in
// registers (r steps of NV loads of A's row c and MR broadcasts of t[i, c]), then one pass over
// the tile's out (and m).
template <int MR, int NV, typename L, typename T>
PPF_INLINE void update_tile(const T* t, int64_t st, const T* A, int64_t sA, const T* m,
                            int64_t sm, int64_t r, T* out, int64_t so, bool load) {
  constexpr int W = sizeof(typename L::V) / sizeof(T);
  L acc[MR][NV];
  PPF_UNROLL
  for (int i = 0; i < MR; ++i) {
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) acc[i][v] = L(T(0));
  }
  for (int64_t c = 0; c < r; ++c) {
    const T* Ac = A + c * sA;
    L av[NV];
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) av[v] = L::load(Ac + v * W);
    PPF_UNROLL
    for (int i = 0; i < MR; ++i) {
      const T s = t[i * st + c];
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) acc[i][v] = acc[i][v] + av[v] * s;
    }
  }
  PPF_UNROLL
  for (int i = 0; i < MR; ++i) {
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) {
      T* o = out + i * so + v * W;
      const L z = m != nullptr ? acc[i][v] * L::load(m + i * sm + v * W) : acc[i][v];
      (load ? L::load(o) + z : z).store(o);
    }
  }
}

template <int M, int NV, typename L, typename T>
PPF_INLINE void update_tail(int64_t rows, const T* t, int64_t st, const T* A, int64_t sA,
                            const T* m, int64_t sm, int64_t r, T* out, int64_t so, bool load) {
  if constexpr (M > 0) {
    if (rows == M) return update_tile<M, NV, L>(t, st, A, sA, m, sm, r, out, so, load);
    update_tail<M - 1, NV, L>(rows, t, st, A, sA, m, sm, r, out, so, load);
  }
}

// All rows of one column tile: MR-row tiles, then the remainder.
template <int NV, typename L, typename T>
PPF_INLINE void update_rows(const T* t, int64_t st, const T* A, int64_t sA, const T* m,
                            int64_t sm, int64_t n, int64_t r, T* out, int64_t so, bool load) {
  constexpr int MR = rows_per_tile<NV>();
  int64_t i = 0;
  for (; i + MR <= n; i += MR)
    update_tile<MR, NV, L>(t + i * st, st, A, sA, m == nullptr ? m : m + i * sm, sm, r,
                           out + i * so, so, load);
  update_tail<MR - 1, NV, L>(n - i, t + i * st, st, A, sA, m == nullptr ? m : m + i * sm, sm, r,
                             out + i * so, so, load);
}

constexpr int64_t kUpdateColumns = 256;  // columns per chunk: A's panel (r × 256) in L1

// The whole update at vector width VB: chunks of columns, and per chunk its column tiles (two
// vectors, one, then single columns for k's tail) over all rows.
template <typename T, int VB>
PPF_INLINE void update_block(const T* t, int64_t st, const T* A, int64_t sA, const T* m,
                             int64_t sm, int64_t n, int64_t r, int64_t k, T* out, int64_t so,
                             bool accumulate) {
  constexpr int N = VB / sizeof(T);
  using L = Lanes<T, N>;
  using S = Lanes<T, 1>;
  for (int64_t j0 = 0; j0 < k; j0 += kUpdateColumns) {
    const int64_t j1 = std::min(k, j0 + kUpdateColumns);
    int64_t q = j0;
    for (; q + 2 * N <= j1; q += 2 * N)
      update_rows<2, L>(t, st, A + q, sA, m == nullptr ? m : m + q, sm, n, r, out + q, so, accumulate);
    for (; q + N <= j1; q += N)
      update_rows<1, L>(t, st, A + q, sA, m == nullptr ? m : m + q, sm, n, r, out + q, so, accumulate);
    for (; q < j1; ++q)
      update_rows<1, S>(t, st, A + q, sA, m == nullptr ? m : m + q, sm, n, r, out + q, so, accumulate);
  }
}

}  // namespace

// The ISA-cloned loops: one symbol per dtype and vector width (PPF_CPU_CLONES), an overload per
// width that calls it, and the entry point that runs the CPU's width.
#define PPF_MM(T, suffix)                                                                      \
  PPF_WIDTH_CLONE(64, mm_##suffix##_64, mm_at,                                                 \
                  (const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t k,       \
                   int64_t r, T* c, int64_t sc, bool accumulate),                              \
                  (a, sa, b, sb, n, k, r, c, sc, accumulate), (mm_block<T, 64>))               \
  PPF_WIDTH_CLONE(32, mm_##suffix##_32, mm_at,                                                 \
                  (const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t k,       \
                   int64_t r, T* c, int64_t sc, bool accumulate),                              \
                  (a, sa, b, sb, n, k, r, c, sc, accumulate), (mm_block<T, 32>))               \
  void skinny_mm_acc(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t k,     \
                     int64_t r, T* c, int64_t sc, bool accumulate) {                           \
    with_cpu_width([&](auto w) { mm_at(w, a, sa, b, sb, n, k, r, c, sc, accumulate); });       \
  }

#define PPF_UPDATE(T, suffix)                                                                  \
  PPF_WIDTH_CLONE(64, update_##suffix##_64, update_at,                                         \
                  (const T* t, int64_t st, const T* A, int64_t sA, const T* m, int64_t sm,     \
                   int64_t n, int64_t r, int64_t k, T* out, int64_t so, bool accumulate),      \
                  (t, st, A, sA, m, sm, n, r, k, out, so, accumulate), (update_block<T, 64>))  \
  PPF_WIDTH_CLONE(32, update_##suffix##_32, update_at,                                         \
                  (const T* t, int64_t st, const T* A, int64_t sA, const T* m, int64_t sm,     \
                   int64_t n, int64_t r, int64_t k, T* out, int64_t so, bool accumulate),      \
                  (t, st, A, sA, m, sm, n, r, k, out, so, accumulate), (update_block<T, 32>))  \
  void rank_update_acc(const T* t, int64_t st, const T* A, int64_t sA, const T* m, int64_t sm, \
                       int64_t n, int64_t r, int64_t k, T* out, int64_t so, bool accumulate) { \
    with_cpu_width([&](auto w) { update_at(w, t, st, A, sA, m, sm, n, r, k, out, so, accumulate); }); \
  }

PPF_MM(float, f32)
PPF_MM(double, f64)
PPF_UPDATE(float, f32)
PPF_UPDATE(double, f64)

// C = a·b: a (n, k), b (k, r), both float32 or both float64, each row unit-stride.
at::Tensor skinny_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  static constexpr const char* op = "skinny_mm";
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, 2);
  check_acc(op, "a", a);
  check_dtype(op, "b", b, a.scalar_type());
  check_same_device(op, "b", b, "a", a);
  PPF_CHECK(op, a.size(1) == b.size(0), "a has shape ", a.sizes(), " and b has shape ", b.sizes(),
            "; expected a's columns to equal b's rows");
  PPF_CHECK(op, has_unit_rows(a) && has_unit_rows(b),
            "a (strides ", a.strides(), ") and b (strides ", b.strides(),
            ") must have unit-stride rows");
  const int64_t n = a.size(0), k = a.size(1), r = b.size(1);
  at::Tensor c = at::empty({n, r}, a.options());
  if (n == 0 || r == 0) return c;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* cp = c.data_ptr<scalar_t>();
    const int64_t sa = a.stride(0), sb = b.stride(0);
    // Whole 24-row groups (a multiple of both tile heights) per thread: at::parallel_for splits
    // the range evenly (tasks of unequal size left one thread idle for 40 % of the op).
    constexpr int64_t kGroup = 24;
    at::parallel_for(0, (n + kGroup - 1) / kGroup, 2, [&](int64_t t0, int64_t t1) {
      const int64_t i0 = t0 * kGroup, i1 = std::min(n, t1 * kGroup);
      skinny_mm_acc(ap + i0 * sa, sa, bp, sb, i1 - i0, k, r, cp + i0 * r, r, false);
    });
  });
  return c;
}

}  // namespace pypeft_fast
