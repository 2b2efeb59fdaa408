// CPU kernel of skinny_t_mm (skinny_t_mm.h): C (r, k) = aᵀ·b, a (n, r) skinny, b (n, k).
//
// Seen as a GEMM with M = r, N = k and the tokens as K, both operands are already in the layout a
// BLAS packs them into: for each token, a's row holds MR consecutive values of the "A" panel and
// b's row NR consecutive values of the "B" panel. So there is no packing: a register tile of
// MR = 6 rows of C × 2 vectors of b's columns takes, per token, 2 vector loads of b and 6
// broadcasts of a for 12 FMAs (15 of AVX2's 16 registers at 32 bytes). Tokens go in blocks of
// kRowBlock so that a block's b panel (kRowBlock × 2 vectors) stays in L1 across C's row tiles;
// each block's sum is formed from zero and added to C once.
//
// MKL's own kernels for this shape were erratic on the AVX2 EPYC (bench/NOTES.md "skinny_t_mm"):
// gyᵀ·u at r = 8 ran 13× slower than uᵀ·gy of the same numbers, and neither orientation was the
// faster one for every (k, r, threads).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "../common/cpu_width.h"
#include "../common/lanes.h"
#include "../ops.h"
#include "skinny_checks.h"
#include "skinny_t_mm.h"

namespace pypeft_fast {
namespace {

constexpr int kMR = 6;           // rows of C per register tile
constexpr int64_t kRowBlock = 128;  // tokens per block: one partial sum, b's panel in L1

// C[0:MR, 0:NV·lanes(L)] (+)= a[rows, 0:MR]ᵀ · b[rows, 0:NV·lanes(L)]: the block's sum starts
// from zero in registers and is added to C once (two-level sums: a running sum over all n tokens
// would grow its rounding error with n, and fail the tolerance rule after a few AdamW steps).
template <int MR, int NV, typename L, typename T>
PPF_INLINE void t_mm_tile(const T* a, int64_t sa, const T* b, int64_t sb, int64_t rows, T* c,
                          int64_t sc, bool load) {
  constexpr int W = sizeof(typename L::V) / sizeof(T);
  L acc[MR][NV];
  PPF_UNROLL
  for (int j = 0; j < MR; ++j) {
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) acc[j][v] = L(T(0));
  }
  for (int64_t i = 0; i < rows; ++i) {
    const T* bi = b + i * sb;
    const T* ai = a + i * sa;
    L bv[NV];
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) bv[v] = L::load(bi + v * W);
    PPF_UNROLL
    for (int j = 0; j < MR; ++j) {
      const T s = ai[j];
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) acc[j][v] = acc[j][v] + bv[v] * s;
    }
  }
  PPF_UNROLL
  for (int j = 0; j < MR; ++j) {
    PPF_UNROLL
    for (int v = 0; v < NV; ++v)
      (load ? L::load(c + j * sc + v * W) + acc[j][v] : acc[j][v]).store(c + j * sc + v * W);
  }
}

// All of C's rows for one column tile: MR-row tiles, then the remainder rows.
template <int NV, typename L, typename T>
PPF_INLINE void t_mm_columns(const T* a, int64_t sa, const T* b, int64_t sb, int64_t rows,
                             int64_t r, T* c, int64_t sc, bool load) {
  int64_t j = 0;
  for (; j + kMR <= r; j += kMR) t_mm_tile<kMR, NV, L>(a + j, sa, b, sb, rows, c + j * sc, sc, load);
  switch (r - j) {
    case 1: t_mm_tile<1, NV, L>(a + j, sa, b, sb, rows, c + j * sc, sc, load); break;
    case 2: t_mm_tile<2, NV, L>(a + j, sa, b, sb, rows, c + j * sc, sc, load); break;
    case 3: t_mm_tile<3, NV, L>(a + j, sa, b, sb, rows, c + j * sc, sc, load); break;
    case 4: t_mm_tile<4, NV, L>(a + j, sa, b, sb, rows, c + j * sc, sc, load); break;
    case 5: t_mm_tile<5, NV, L>(a + j, sa, b, sb, rows, c + j * sc, sc, load); break;
    default: break;
  }
}

// The whole product at vector width VB: blocks of tokens, and per block every column tile (two
// vectors, then one vector, then single columns for k's tail).
template <typename T, int VB>
PPF_INLINE void t_mm_block(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t r, int64_t k,
                T* c, int64_t sc, bool accumulate) {
  constexpr int N = VB / sizeof(T);
  using L = Lanes<T, N>;
  using S = Lanes<T, 1>;
  if (n == 0 && !accumulate) {
    for (int64_t j = 0; j < r; ++j) std::fill(c + j * sc, c + j * sc + k, T(0));
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, n - i0);
    const bool load = accumulate || i0 > 0;
    const T* ab = a + i0 * sa;
    const T* bb = b + i0 * sb;
    int64_t q = 0;
    for (; q + 2 * N <= k; q += 2 * N) t_mm_columns<2, L>(ab, sa, bb + q, sb, rows, r, c + q, sc, load);
    for (; q + N <= k; q += N) t_mm_columns<1, L>(ab, sa, bb + q, sb, rows, r, c + q, sc, load);
    for (; q < k; ++q) t_mm_columns<1, S>(ab, sa, bb + q, sb, rows, r, c + q, sc, load);
  }
}

}  // namespace

// The ISA-cloned loops: one symbol per dtype and vector width (PPF_CPU_CLONES), an overload per
// width that calls it, and the entry point that runs the CPU's width.
#define PPF_T_MM(T, suffix)                                                                    \
  PPF_WIDTH_CLONE(64, t_mm_##suffix##_64, t_mm_at,                                             \
                  (const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t r,       \
                   int64_t k, T* c, int64_t sc, bool accumulate),                              \
                  (a, sa, b, sb, n, r, k, c, sc, accumulate), (t_mm_block<T, 64>))             \
  PPF_WIDTH_CLONE(32, t_mm_##suffix##_32, t_mm_at,                                             \
                  (const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t r,       \
                   int64_t k, T* c, int64_t sc, bool accumulate),                              \
                  (a, sa, b, sb, n, r, k, c, sc, accumulate), (t_mm_block<T, 32>))             \
  void skinny_t_mm_acc(const T* a, int64_t sa, const T* b, int64_t sb, int64_t n, int64_t r,   \
                       int64_t k, T* c, int64_t sc, bool accumulate) {                         \
    with_cpu_width([&](auto w) { t_mm_at(w, a, sa, b, sb, n, r, k, c, sc, accumulate); });     \
  }

PPF_T_MM(float, f32)
PPF_T_MM(double, f64)

namespace {

// Columns per parallel task: whole two-vector tiles, at least two tasks per thread when k allows,
// at most 256 columns (a token block's b panel of 256 × 256 values stays in L2).
int64_t column_chunk(int64_t k, int64_t tile) {
  const int64_t tasks = 2 * std::max(1, at::get_num_threads());
  const int64_t chunk = (k + tasks - 1) / tasks;
  return std::clamp<int64_t>((chunk + tile - 1) / tile * tile, tile, 256);
}

}  // namespace

// C = aᵀ·b: a (n, r), b (n, k), both float32 or both float64, each row unit-stride.
at::Tensor skinny_t_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  static constexpr const char* op = "skinny_t_mm";
  check_skinny_operands(op, a, b);
  PPF_CHECK(op, a.size(0) == b.size(0), "a has shape ", a.sizes(), " and b has shape ", b.sizes(),
            "; expected the same number of rows (tokens)");
  const int64_t n = a.size(0), r = a.size(1), k = b.size(1);
  at::Tensor c = at::empty({r, k}, a.options());
  if (r == 0 || k == 0) return c;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), op, [&] {
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    scalar_t* cp = c.data_ptr<scalar_t>();
    const int64_t sa = a.stride(0), sb = b.stride(0);
    const int64_t chunk = column_chunk(k, 2 * cpu_vector_bytes() / int64_t(sizeof(scalar_t)));
    at::parallel_for(0, (k + chunk - 1) / chunk, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t q0 = t * chunk, q1 = std::min(k, q0 + chunk);
        skinny_t_mm_acc(ap, sa, bp + q0, sb, n, r, q1 - q0, cp + q0, k, false);
      }
    });
  });
  return c;
}

}  // namespace pypeft_fast
