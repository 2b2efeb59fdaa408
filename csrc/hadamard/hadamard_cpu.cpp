// CPU kernels of the Hadamard family's dense form (pypeft_fast/families/hadamard.py), one pass
// over a weight-sized matrix each, M1 = W1a·W1b and M2 = W2a·W2b formed tile by tile in registers
// and never stored:
//
//   hadamard_weight:          W' = W + s·M1⊙M2, in W's dtype (summed in the factors' dtype,
//                             rounded once) — the forward's and dx's GEMM operand;
//   hadamard_factor_grads:    dW1a = (G⊙M2)·W1bᵀ, dW1b = W1aᵀ·(G⊙M2), dW2a = (G⊙M1)·W2bᵀ,
//                             dW2b = W2aᵀ·(G⊙M1) from one read of G, G⊙M2 and G⊙M1 formed per
//                             tile and never stored.
//
// The torch path makes five out×in float32 transients for W' (M1, M2, the float32 copy of W, W',
// its cast) and four for the gradients (M1, M2, G⊙M2, G⊙M1, each read twice more by the rank
// products; bench/NOTES.md "Session 12"). A register tile is MR rows × NV vectors
// of columns for both products: per rank step one vector load per NV from a packed panel of the
// W1b/W2b columns and MR broadcasts of W1a/W2a. The panel (r × the tile's columns, contiguous)
// is packed once per row block: W1b's rows are in·4 bytes apart, and r of them at a 4 KiB stride
// share one set of the 8-way L1. Each element's sums over the rank run in order: the result does
// not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "../common/cpu_width.h"
#include "../common/lanes.h"
#include "../common/rows.h"
#include "../ops.h"

namespace pypeft_fast {
namespace {

constexpr int64_t kRowBlock = 48;  // rows per task: a multiple of every tile height below
// hadamard_factor_grads' rows per block: each block writes an (r1 + r2) × in partial of dW1b
// and dW2b, so fewer, taller blocks (a multiple of the tile heights too).
constexpr int64_t kFactorRowBlock = 96;

// The rank-r factors of both products and the packed panel of the current column tile.
template <typename T>
struct Factors {
  const T* a1;
  int64_t sa1;
  const T* b1;
  int64_t sb1;
  int64_t r1;
  const T* a2;
  int64_t sa2;
  const T* b2;
  int64_t sb2;
  int64_t r2;
};

// Rows per register tile: 2·MR·NV accumulators plus NV loaded vectors fit the register file
// (AVX-512: 32 registers; AVX2: 16).
template <int NV, int VB>
constexpr int tile_rows() { return VB == 64 ? (NV == 2 ? 6 : 8) : (NV == 2 ? 3 : 6); }

// m = a[rows, 0:r]·panel[0:r, tile] for one tile, summed from zero over the rank steps in order.
template <int MR, int NV, typename L, typename T>
PPF_INLINE void rank_product(const T* a, int64_t sa, const T* panel, int64_t r, int64_t sp,
                             L (&m)[MR][NV]) {
  constexpr int W = sizeof(typename L::V) / sizeof(T);
  PPF_UNROLL
  for (int i = 0; i < MR; ++i) {
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) m[i][v] = L(T(0));
  }
  for (int64_t p = 0; p < r; ++p) {
    L b[NV];
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = L::load(panel + p * sp + v * W);
    PPF_UNROLL
    for (int i = 0; i < MR; ++i) {
      const T s = a[i * sa + p];
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) m[i][v] = m[i][v] + b[v] * s;
    }
  }
}

// The factor products of one tile: m1 = W1a[rows]·panel1, m2 = W2a[rows]·panel2.
template <int MR, int NV, typename L, typename T>
PPF_INLINE void tile_products(const T* a1, int64_t sa1, const T* p1, int64_t r1, const T* a2,
                              int64_t sa2, const T* p2, int64_t r2, int64_t sp, L (&m1)[MR][NV],
                              L (&m2)[MR][NV]) {
  rank_product<MR, NV, L>(a1, sa1, p1, r1, sp, m1);
  rank_product<MR, NV, L>(a2, sa2, p2, r2, sp, m2);
}

// hadamard_factor_grads' epilogue: with g1 = g⊙m2 and g2 = g⊙m1 of the tile (never stored),
//   db1[p, cols] += Σ_rows W1a[row, p]·g1[row, cols]   (the row block's part of dW1b; W2 alike)
//   da1[row][p]  += g1[row, cols]·W1b[p, cols]         (lane-wise; summed over the lanes at the
//                                                       block's end: dW1a; W2 alike)
// da holds kFactorRowBlock rows × (r1 + r2) vectors of the widest lanes (a narrower tile adds
// into the first lanes), db the block's (r1 + r2) × in partial.
template <typename T>
struct FactorGradEpilogue {
  const T* g;
  int64_t sg;
  int64_t row0;  // the block's first row: da's row 0
  T* da;
  int64_t da_row;  // (r1 + r2) × the widest lanes
  int64_t da_lanes;
  T* db;  // (r1 + r2) × in
  int64_t sdb;

  template <int MR, int NV, typename L>
  PPF_INLINE void apply(int64_t row, int64_t col, const L (&m1)[MR][NV], const L (&m2)[MR][NV],
                        const Factors<T>& f, const T* panel, int64_t sp) const {
    constexpr int W = sizeof(typename L::V) / sizeof(T);
    L g1[MR][NV], g2[MR][NV];
    PPF_UNROLL
    for (int i = 0; i < MR; ++i) {
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) {
        const L gv = L::load(g + (row + i) * sg + col + v * W);
        g1[i][v] = gv * m2[i][v];
        g2[i][v] = gv * m1[i][v];
      }
    }
    side<MR, NV, L>(row, col, g1, f.a1 + row * f.sa1, f.sa1, panel, f.r1, 0, sp);
    side<MR, NV, L>(row, col, g2, f.a2 + row * f.sa2, f.sa2, panel + f.r1 * sp, f.r2, f.r1, sp);
  }

  // One product's two gradients from its operand h (g1 or g2): rank steps p of a (W1a or W2a
  // rows) and the packed panel (W1b or W2b columns); `first` is its first row in da and db.
  template <int MR, int NV, typename L>
  PPF_INLINE void side(int64_t row, int64_t col, const L (&h)[MR][NV], const T* a, int64_t sa,
                       const T* pan, int64_t r, int64_t first, int64_t sp) const {
    constexpr int W = sizeof(typename L::V) / sizeof(T);
    for (int64_t p = 0; p < r; ++p) {
      L bv[NV], acc[NV];
      T* dbp = db + (first + p) * sdb + col;
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) {
        bv[v] = L::load(pan + p * sp + v * W);
        acc[v] = L::load(dbp + v * W);
      }
      PPF_UNROLL
      for (int i = 0; i < MR; ++i) {
        const T s = a[i * sa + p];
        L dot = h[i][0] * bv[0];
        PPF_UNROLL
        for (int v = 0; v < NV; ++v) {
          acc[v] = acc[v] + h[i][v] * s;
          if (v > 0) dot = dot + h[i][v] * bv[v];
        }
        T* dap = da + (row - row0 + i) * da_row + (first + p) * da_lanes;
        (L::load(dap) + dot).store(dap);
      }
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) acc[v].store(dbp + v * W);
    }
  }
};


// hadamard_weight's epilogue: out = W + s·m1⊙m2 for the tile at (row, col).
template <typename T, typename w_t>
struct WeightEpilogue {
  const w_t* w;
  int64_t sw;
  w_t* out;
  int64_t so;
  T s;

  template <int MR, int NV, typename L>
  PPF_INLINE void apply(int64_t row, int64_t col, const L (&m1)[MR][NV], const L (&m2)[MR][NV],
                        const Factors<T>&, const T*, int64_t) const {
    constexpr int W = sizeof(typename L::V) / sizeof(T);
    PPF_UNROLL
    for (int i = 0; i < MR; ++i) {
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) {
        const L d = m1[i][v] * m2[i][v] * s;
        const w_t* wi = w + (row + i) * sw + col + v * W;
        w_t* oi = out + (row + i) * so + col + v * W;
        if constexpr (std::is_same_v<w_t, T>) {
          (L::load(wi) + d).store(oi);
        } else {
          T buf[W];
          d.store(buf);
          for (int l = 0; l < W; ++l) oi[l] = static_cast<w_t>(static_cast<T>(wi[l]) + buf[l]);
        }
      }
    }
  }
};

template <int MR, int NV, typename L, typename T, typename E>
PPF_INLINE void tile(const Factors<T>& f, const T* panel, int64_t sp, int64_t row, int64_t col,
                     const E& epi) {
  L m1[MR][NV], m2[MR][NV];
  tile_products<MR, NV, L>(f.a1 + row * f.sa1, f.sa1, panel, f.r1, f.a2 + row * f.sa2, f.sa2,
                           panel + f.r1 * sp, f.r2, sp, m1, m2);
  epi.template apply<MR, NV, L>(row, col, m1, m2, f, panel, sp);
}

template <int M, int NV, typename L, typename T, typename E>
PPF_INLINE void tile_tail(int64_t rows, const Factors<T>& f, const T* panel, int64_t sp,
                          int64_t row, int64_t col, const E& epi) {
  if constexpr (M > 0) {
    if (rows == M) return tile<M, NV, L>(f, panel, sp, row, col, epi);
    tile_tail<M - 1, NV, L>(rows, f, panel, sp, row, col, epi);
  }
}

// Rows [i0, i1) of the column tile at col, `width` columns packed into panel.
template <int NV, int MR, typename L, typename T, typename E>
PPF_INLINE void tile_rows_of(int64_t i0, int64_t i1, int64_t col, int64_t width,
                             const Factors<T>& f, T* panel, const E& epi) {
  for (int64_t p = 0; p < f.r1; ++p)
    std::copy(f.b1 + p * f.sb1 + col, f.b1 + p * f.sb1 + col + width, panel + p * width);
  for (int64_t q = 0; q < f.r2; ++q)
    std::copy(f.b2 + q * f.sb2 + col, f.b2 + q * f.sb2 + col + width, panel + (f.r1 + q) * width);
  int64_t i = i0;
  for (; i + MR <= i1; i += MR) tile<MR, NV, L>(f, panel, width, i, col, epi);
  tile_tail<MR - 1, NV, L>(i1 - i, f, panel, width, i, col, epi);
}

// Rows [i0, i1), all `cols` columns: tiles of two vectors, one, half a vector, then single
// columns. panel holds (r1 + r2) × two vectors.
template <typename T, int VB, typename E>
PPF_INLINE void block(int64_t i0, int64_t i1, int64_t cols, const Factors<T>& f, T* panel,
                      const E& epi) {
  constexpr int N = VB / sizeof(T);
  constexpr int NH = N >= 4 ? N / 2 : 1;
  using L = Lanes<T, N>;
  using H = Lanes<T, NH>;
  using S = Lanes<T, 1>;
  int64_t q = 0;
  for (; q + 2 * N <= cols; q += 2 * N)
    tile_rows_of<2, tile_rows<2, VB>(), L>(i0, i1, q, 2 * N, f, panel, epi);
  for (; q + N <= cols; q += N) tile_rows_of<1, tile_rows<1, VB>(), L>(i0, i1, q, N, f, panel, epi);
  if constexpr (NH > 1)
    for (; q + NH <= cols; q += NH)
      tile_rows_of<1, tile_rows<1, VB>(), H>(i0, i1, q, NH, f, panel, epi);
  for (; q < cols; ++q) tile_rows_of<1, tile_rows<1, VB>(), S>(i0, i1, q, 1, f, panel, epi);
}

template <typename T, typename w_t, int VB>
PPF_INLINE void weight_block(int64_t i0, int64_t i1, int64_t cols, const Factors<T>& f, T* panel,
                             const w_t* w, int64_t sw, w_t* out, int64_t so, T s) {
  block<T, VB>(i0, i1, cols, f, panel, WeightEpilogue<T, w_t>{w, sw, out, so, s});
}

template <typename T, int VB>
PPF_INLINE void factor_grad_block(int64_t i0, int64_t i1, int64_t cols, const Factors<T>& f,
                                  T* panel, const T* g, int64_t sg, T* da, int64_t da_lanes,
                                  T* db) {
  const int64_t da_row = (f.r1 + f.r2) * da_lanes;
  block<T, VB>(i0, i1, cols, f, panel,
               FactorGradEpilogue<T>{g, sg, i0, da, da_row, da_lanes, db, cols});
}

}  // namespace

// The ISA-cloned loops: one symbol per dtype (pair) and vector width, an overload per width.
#define PPF_WEIGHT(T, w_t, suffix)                                                            \
  PPF_WIDTH_CLONE(64, hadamard_weight_##suffix##_64, weight_at,                               \
                  (int64_t i0, int64_t i1, int64_t cols, const Factors<T>& f, T* panel,       \
                   const w_t* w, int64_t sw, w_t* out, int64_t so, T s),                      \
                  (i0, i1, cols, f, panel, w, sw, out, so, s), (weight_block<T, w_t, 64>))    \
  PPF_WIDTH_CLONE(32, hadamard_weight_##suffix##_32, weight_at,                               \
                  (int64_t i0, int64_t i1, int64_t cols, const Factors<T>& f, T* panel,       \
                   const w_t* w, int64_t sw, w_t* out, int64_t so, T s),                      \
                  (i0, i1, cols, f, panel, w, sw, out, so, s), (weight_block<T, w_t, 32>))
#define PPF_FACTOR_GRAD(T, suffix)                                                            \
  PPF_WIDTH_CLONE(64, hadamard_factor_grad_##suffix##_64, factor_grad_at,                     \
                  (int64_t i0, int64_t i1, int64_t cols, const Factors<T>& f, T* panel,       \
                   const T* g, int64_t sg, T* da, int64_t da_lanes, T* db),                   \
                  (i0, i1, cols, f, panel, g, sg, da, da_lanes, db), (factor_grad_block<T, 64>)) \
  PPF_WIDTH_CLONE(32, hadamard_factor_grad_##suffix##_32, factor_grad_at,                     \
                  (int64_t i0, int64_t i1, int64_t cols, const Factors<T>& f, T* panel,       \
                   const T* g, int64_t sg, T* da, int64_t da_lanes, T* db),                   \
                  (i0, i1, cols, f, panel, g, sg, da, da_lanes, db), (factor_grad_block<T, 32>))

PPF_WEIGHT(float, float, f32_f32)
PPF_WEIGHT(float, double, f32_f64)
PPF_WEIGHT(float, c10::BFloat16, f32_bf16)
PPF_WEIGHT(float, c10::Half, f32_f16)
PPF_WEIGHT(double, float, f64_f32)
PPF_WEIGHT(double, double, f64_f64)
PPF_WEIGHT(double, c10::BFloat16, f64_bf16)
PPF_WEIGHT(double, c10::Half, f64_f16)
PPF_FACTOR_GRAD(float, f32)
PPF_FACTOR_GRAD(double, f64)

namespace {

// The four factors against a weight-sized (out, in) operand: 2-D, one accumulation dtype, one
// device, W1a (out, r1), W1b (r1, in), W2a (out, r2), W2b (r2, in).
void check_factors(const char* op, const char* big_arg, const at::Tensor& big, const at::Tensor& W1a,
                   const at::Tensor& W1b, const at::Tensor& W2a, const at::Tensor& W2b) {
  check_dim(op, big_arg, big, 2);
  const std::pair<const char*, const at::Tensor*> factors[] = {
      {"W1a", &W1a}, {"W1b", &W1b}, {"W2a", &W2a}, {"W2b", &W2b}};
  for (const auto& [name, t] : factors) {
    check_dim(op, name, *t, 2);
    check_dtype(op, name, *t, W1a.scalar_type());
    check_same_device(op, name, *t, big_arg, big);
  }
  check_acc(op, "W1a", W1a);
  const int64_t out = big.size(0), in = big.size(1), r1 = W1a.size(1), r2 = W2a.size(1);
  PPF_CHECK(op, W1a.size(0) == out && W1b.size(0) == r1 && W1b.size(1) == in &&
                    W2a.size(0) == out && W2b.size(0) == r2 && W2b.size(1) == in,
            "W1a ", W1a.sizes(), ", W1b ", W1b.sizes(), ", W2a ", W2a.sizes(), ", W2b ", W2b.sizes(),
            " do not match ", big_arg, " ", big.sizes(),
            "; expected (out, r1), (r1, in), (out, r2), (r2, in)");
}

// Row blocks of kRowBlock over the threads, each with its own panel: (r1 + r2) × two vectors of
// the widest lanes (64 bytes).
template <typename T, typename F>
void over_row_blocks(int64_t out, int64_t r1, int64_t r2, F&& body) {
  const int64_t blocks = (out + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> panel((r1 + r2) * 2 * (64 / sizeof(T)));
    for (int64_t b = b0; b < b1; ++b)
      body(b * kRowBlock, std::min(out, (b + 1) * kRowBlock), panel.data());
  });
}

template <typename T>
Factors<T> factors_of(const at::Tensor& W1a, const at::Tensor& W1b, const at::Tensor& W2a,
                      const at::Tensor& W2b) {
  return {W1a.const_data_ptr<T>(), W1a.stride(0), W1b.const_data_ptr<T>(), W1b.stride(0),
          W1a.size(1),             W2a.const_data_ptr<T>(), W2a.stride(0), W2b.const_data_ptr<T>(),
          W2b.stride(0),           W2a.size(1)};
}

}  // namespace

at::Tensor hadamard_weight_cpu(const at::Tensor& W_, const at::Tensor& W1a_, const at::Tensor& W1b_,
                               const at::Tensor& W2a_, const at::Tensor& W2b_, double scaling) {
  static constexpr const char* op = "hadamard_weight";
  check_factors(op, "W", W_, W1a_, W1b_, W2a_, W2b_);
  check_floating(op, "W", W_);
  // Detached (at::parallel_for's workers do not inherit grad mode) and row-major.
  const at::Tensor W = unit_rows(W_.detach()), W1a = W1a_.detach().contiguous(),
                   W1b = W1b_.detach().contiguous(), W2a = W2a_.detach().contiguous(),
                   W2b = W2b_.detach().contiguous();
  const int64_t out = W.size(0), in = W.size(1);
  at::Tensor result = at::empty({out, in}, W.options());
  if (out == 0 || in == 0) return result;
  AT_DISPATCH_FLOATING_TYPES(W1a.scalar_type(), op, [&] {
    using T = scalar_t;
    const Factors<T> f = factors_of<T>(W1a, W1b, W2a, W2b);
    const T s = static_cast<T>(scaling);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), op, [&] {
      using w_t = scalar_t;
      const w_t* wp = W.const_data_ptr<w_t>();
      w_t* op_ = result.mutable_data_ptr<w_t>();
      const int64_t sw = W.stride(0);
      over_row_blocks<T>(out, f.r1, f.r2, [&](int64_t i0, int64_t i1, T* panel) {
        with_cpu_width([&](auto w) { weight_at(w, i0, i1, in, f, panel, wp, sw, op_, in, s); });
      });
    });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hadamard_factor_grads_cpu(
    const at::Tensor& G_, const at::Tensor& W1a_, const at::Tensor& W1b_, const at::Tensor& W2a_,
    const at::Tensor& W2b_) {
  static constexpr const char* op = "hadamard_factor_grads";
  check_factors(op, "G", G_, W1a_, W1b_, W2a_, W2b_);
  check_dtype(op, "G", G_, W1a_.scalar_type());
  const at::Tensor G = unit_rows(G_.detach()), W1a = W1a_.detach().contiguous(),
                   W1b = W1b_.detach().contiguous(), W2a = W2a_.detach().contiguous(),
                   W2b = W2b_.detach().contiguous();
  const int64_t out = G.size(0), in = G.size(1), r1 = W1a.size(1), r2 = W2a.size(1);
  const int64_t blocks = (out + kFactorRowBlock - 1) / kFactorRowBlock;
  at::Tensor da = at::empty({out, r1 + r2}, G.options());
  // Each row block's part of dW1b and dW2b, summed over the blocks in order afterwards: the
  // result does not depend on the thread count.
  at::Tensor db_parts = at::empty({std::max<int64_t>(blocks, 1), r1 + r2, in}, G.options());
  if (out == 0 || in == 0) db_parts.zero_();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), op, [&] {
    using T = scalar_t;
    const Factors<T> f = factors_of<T>(W1a, W1b, W2a, W2b);
    const T* gp = G.const_data_ptr<T>();
    const int64_t sg = G.stride(0);
    constexpr int64_t lanes = 64 / sizeof(T);
    T* dap = da.mutable_data_ptr<T>();
    T* dbp = db_parts.mutable_data_ptr<T>();
    if (out == 0 || in == 0) {
      std::fill(dap, dap + da.numel(), T(0));
      return;
    }
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> panel((r1 + r2) * 2 * lanes);
      std::vector<T> acc(kFactorRowBlock * (r1 + r2) * lanes);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kFactorRowBlock, i1 = std::min(out, i0 + kFactorRowBlock);
        T* db = dbp + b * (r1 + r2) * in;
        std::fill(db, db + (r1 + r2) * in, T(0));
        std::fill(acc.begin(), acc.end(), T(0));
        with_cpu_width([&](auto w) {
          factor_grad_at(w, i0, i1, in, f, panel.data(), gp, sg, acc.data(), lanes, db);
        });
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t p = 0; p < r1 + r2; ++p) {
            const T* a = acc.data() + ((i - i0) * (r1 + r2) + p) * lanes;
            T sum = T(0);
            for (int64_t l = 0; l < lanes; ++l) sum += a[l];
            dap[i * (r1 + r2) + p] = sum;
          }
      }
    });
  });
  // The blocks' partials summed in block order, element by element (at::sum may split the
  // blocks between threads, which would make the result depend on the thread count).
  at::Tensor db1 = at::empty({r1, in}, G.options()), db2 = at::empty({r2, in}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), op, [&] {
    using T = scalar_t;
    const T* parts = db_parts.const_data_ptr<T>();
    T* dst1 = db1.mutable_data_ptr<T>();
    T* dst2 = db2.mutable_data_ptr<T>();
    const int64_t elems = (r1 + r2) * in, split = r1 * in, nparts = db_parts.size(0);
    at::parallel_for(0, elems, 4096, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        T sum = parts[e];
        for (int64_t b = 1; b < nparts; ++b) sum += parts[b * elems + e];
        (e < split ? dst1[e] : dst2[e - split]) = sum;
      }
    });
  });
  return {da.narrow(1, 0, r1).contiguous(), db1, da.narrow(1, r1, r2).contiguous(), db2};
}

}  // namespace pypeft_fast
