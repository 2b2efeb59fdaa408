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

#include "../common/cpu_width.h"
#include "../common/lanes.h"
#include "../ops.h"
#include "skinny_checks.h"
#include "skinny_mm.h"

namespace pypeft_fast {
namespace {

constexpr int64_t kKBlock = 64;       // skinny_mm's steps along k per block (header)
// skinny_mm's rows per pass along k (whole tiles of 8 and of 6 rows): a's rows are read start to
// end, 24 streams. It was all n rows per 64-step block, 256-byte strips of every row 16 times at
// k = 1024: 1.6-2x slower (0.21 against 0.13 ms at 1024 x 1024, r = 16, 2 threads, session 15).
constexpr int64_t kRowChunk = 24;
constexpr int64_t kUpdateColumns = 256;  // rank_update's columns per chunk: A's panel (r × 256) in L1

// Rows per register tile: 6 × 2 vectors, or 8 × 1 (not 12: twelve rows of a 4 KiB row stride map
// to one set of the 8-way L1 and evict each other every step, 2.2× slower at k = 1024).
template <int NV>
constexpr int rows_per_tile() { return NV == 1 ? 8 : 12 / NV; }

// out[0:MR, 0:NV·lanes(L)] = [out +] (a[0:MR, 0:steps] · b[0:steps, 0:NV·lanes(L)]) ⊙ m (m
// nullptr: no multipliers): both kernels' product. The sum over the steps is formed from zero in
// registers, NV vector loads of b's row and MR broadcasts of a's column per step, then one pass
// over the tile's out (and m).
template <int MR, int NV, typename L, typename T>
PPF_INLINE void product_tile(const T* a, int64_t sa, const T* b, int64_t sb, int64_t steps,
                             const T* m, int64_t sm, T* out, int64_t so, bool load) {
  constexpr int W = sizeof(typename L::V) / sizeof(T);
  L acc[MR][NV];
  PPF_UNROLL
  for (int i = 0; i < MR; ++i) {
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) acc[i][v] = L(T(0));
  }
  for (int64_t j = 0; j < steps; ++j) {
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
    for (int v = 0; v < NV; ++v) {
      T* o = out + i * so + v * W;
      const L z = m != nullptr ? acc[i][v] * L::load(m + i * sm + v * W) : acc[i][v];
      (load ? L::load(o) + z : z).store(o);
    }
  }
}

template <int M, int NV, typename L, typename T>
PPF_INLINE void product_tail(int64_t rows, const T* a, int64_t sa, const T* b, int64_t sb,
                             int64_t steps, const T* m, int64_t sm, T* out, int64_t so, bool load) {
  if constexpr (M > 0) {
    if (rows == M) return product_tile<M, NV, L>(a, sa, b, sb, steps, m, sm, out, so, load);
    product_tail<M - 1, NV, L>(rows, a, sa, b, sb, steps, m, sm, out, so, load);
  }
}

// All n rows of one column tile: whole register tiles, then one of the n % MR rows left (a
// tile's height is a template argument: its loops unroll over the rows).
template <int NV, typename L, typename T>
PPF_INLINE void product_rows(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n,
                             int64_t steps, const T* m, int64_t sm, T* out, int64_t so, bool load) {
  constexpr int MR = rows_per_tile<NV>();
  int64_t i = 0;
  for (; i + MR <= n; i += MR)
    product_tile<MR, NV, L>(a + i * sa, sa, b, sb, steps, m == nullptr ? m : m + i * sm, sm,
                            out + i * so, so, load);
  product_tail<MR - 1, NV, L>(n - i, a + i * sa, sa, b, sb, steps, m == nullptr ? m : m + i * sm,
                              sm, out + i * so, so, load);
}

// Columns [q0, q1) of the product at vector width VB, in column tiles of two vectors, one, half a
// vector, then single columns.
template <typename T, int VB>
PPF_INLINE void product_columns(int64_t q0, int64_t q1, const T* a, int64_t sa, const T* b,
                                int64_t sb, int64_t n, int64_t steps, const T* m, int64_t sm,
                                T* out, int64_t so, bool load) {
  constexpr int N = VB / sizeof(T);
  constexpr int NH = N >= 4 ? N / 2 : 1;
  using L = Lanes<T, N>;
  using H = Lanes<T, NH>;
  using S = Lanes<T, 1>;
  const auto at = [m](int64_t q) { return m == nullptr ? m : m + q; };
  int64_t q = q0;
  for (; q + 2 * N <= q1; q += 2 * N)
    product_rows<2, L>(a, sa, b + q, sb, n, steps, at(q), sm, out + q, so, load);
  for (; q + N <= q1; q += N)
    product_rows<1, L>(a, sa, b + q, sb, n, steps, at(q), sm, out + q, so, load);
  if constexpr (NH > 1)
    for (; q + NH <= q1; q += NH)
      product_rows<1, H>(a, sa, b + q, sb, n, steps, at(q), sm, out + q, so, load);
  for (; q < q1; ++q) product_rows<1, S>(a, sa, b + q, sb, n, steps, at(q), sm, out + q, so, load);
}

// skinny_mm: blocks of kKBlock steps along k, each block's product over all of C's r columns
// (added to C after the first).
template <typename T, int VB>
PPF_INLINE void mm_block(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t k,
                         int64_t r, T* c, int64_t sc, bool accumulate) {
  if (k == 0 && !accumulate) {
    for (int64_t i = 0; i < n; ++i) std::fill(c + i * sc, c + i * sc + r, T(0));
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += kRowChunk) {
    const int64_t rows = std::min(kRowChunk, n - i0);
    for (int64_t j0 = 0; j0 < k; j0 += kKBlock)
      product_columns<T, VB>(0, r, a + i0 * sa + j0, sa, b + j0 * sb, sb, rows,
                             std::min(kKBlock, k - j0), nullptr, 0, c + i0 * sc, sc,
                             accumulate || j0 > 0);
  }
}

// rank_update: all r steps at once (r is the skinny side), chunks of kUpdateColumns columns.
template <typename T, int VB>
PPF_INLINE void update_block(const T* t, int64_t st, const T* A, int64_t sA, const T* m,
                             int64_t sm, int64_t n, int64_t r, int64_t k, T* out, int64_t so,
                             bool accumulate) {
  for (int64_t j0 = 0; j0 < k; j0 += kUpdateColumns)
    product_columns<T, VB>(j0, std::min(k, j0 + kUpdateColumns), t, st, A, sA, n, r, m, sm, out,
                           so, accumulate);
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
  check_skinny_operands(op, a, b);
  PPF_CHECK(op, a.size(1) == b.size(0), "a has shape ", a.sizes(), " and b has shape ", b.sizes(),
            "; expected a's columns to equal b's rows");
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
