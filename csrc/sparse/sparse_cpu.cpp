// CPU launchers of the sparse family: SpMM (x·Sᵀ, accumulated into an output) and SDDMM.
//
// Both work on blocks of NB tokens transposed into a thread-local buffer xT (C, NB) in the
// accumulation dtype, so that one CSR entry is one NB-wide vector FMA (csr_row_apply with
// Vec = Lanes<acc_t, NB>) instead of NB scalar gathers. The hot loops are plain functions
// compiled per ISA (PPF_CPU_CLONES) and instantiated per vector width VB (64 or 32 bytes,
// common/cpu_width.h: the launchers run the CPU's); the loads/stores around them convert dtypes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "../common/cpu_width.h"
#include "../common/lanes.h"
#include "../ops.h"
#include "sparse_body.h"
#include "sparse_checks.h"

namespace pypeft_fast {
namespace {

// At vector width VB bytes: W values per vector; tokens per block: for SpMM two vectors (each
// stored entry's column index and value are loaded once for both; one vector ran 1.0-1.6x slower
// on AVX2, bench/NOTES.md "SpMM: two vectors per entry", and 1.03-1.15x slower on an AVX-512
// Xeon, where four ran as fast as two; but 1.04-1.08x faster at 14336 columns of x, where
// two vectors of xT outgrow L2: "Session 13"); 256 bytes of tokens for SDDMM (64 floats:
// 4 vectors at 64 bytes, 8 at 32), over which each entry's lane sum is amortised. (At 32 bytes,
// 4 vectors ran 1.15-1.4x slower than 8; 2 vectors 1.5x slower; 16 no faster: bench/NOTES.md
// "SDDMM token block".)
template <typename acc_t, int VB>
struct Blocking {
  static constexpr int W = VB / static_cast<int>(sizeof(acc_t));
  static constexpr int kSpmmVectors = 2;
  static constexpr int kSpmm = kSpmmVectors * W, kSddmm = 256 / static_cast<int>(sizeof(acc_t));
};
// SDDMM reduces the entries of this many CSR rows at a time (an L1-sized parking buffer).
constexpr int64_t kSddmmRowChunk = 32;

template <typename acc_t, int NB>
struct LoadLanes {  // x(c) = xT[c, 0:NB]
  const acc_t* xT;
  PPF_HD Lanes<acc_t, NB> operator()(int64_t c) const { return Lanes<acc_t, NB>::load(xT + c * NB); }
};
template <typename acc_t, int W, int G>
struct LoadLaneGroup {  // x(c) = xT[c, 0:G*W] as G vectors
  const acc_t* xT;
  PPF_HD LaneGroup<acc_t, W, G> operator()(int64_t c) const {
    return LaneGroup<acc_t, W, G>::load(xT + c * (G * W));
  }
};

// SDDMM sink: folds an entry's NB-token product to one vector of W lanes and parks it; flush()
// reduces W parked vectors at a time with transpose_sum and adds them to partial[k] as a vector.
template <typename acc_t, int NB, int W>
struct FoldSink {
  using VW = Lanes<acc_t, W>;
  acc_t* parked;  // (entries, W), no alignment assumed (memcpy loads/stores)
  int64_t k0;
  PPF_HD void operator()(int64_t k, const Lanes<acc_t, NB>& prod) {
    prod.template fold<W>().store(parked + (k - k0) * W);
  }
  PPF_INLINE void flush(int64_t k1, acc_t* partial) const {
    const int64_t m = k1 - k0;
    int64_t j = 0;
    for (; j + W <= m; j += W) {
      VW v[W];
      for (int i = 0; i < W; ++i) v[i] = VW::load(parked + (j + i) * W);
      (VW::load(partial + k0 + j) + transpose_sum<acc_t, W>(v)).store(partial + k0 + j);
    }
    for (; j < m; ++j) partial[k0 + j] += VW::load(parked + j * W).sum();
  }
};

// One token block: xT (C, G*W) -> yT (R, G*W). The block is G separate W-lane vectors, not one
// Lanes<acc_t, G*W>: GCC kept a loop-carried vector wider than a register on the stack (4x
// slower; bench/NOTES.md "SpMM: two vectors per entry").
template <typename acc_t, int W, int G>
PPF_INLINE void spmm_block(const int64_t* ptr, const int64_t* col, const acc_t* val, int64_t R,
                           const acc_t* xT, acc_t* yT) {
  using V = LaneGroup<acc_t, W, G>;
  const LoadLaneGroup<acc_t, W, G> load{xT};
  for (int64_t r = 0; r < R; ++r) csr_row_apply<V>(ptr, col, val, r, load).store(yT + r * (G * W));
}

// Rows [r0, r1) of one token block; gT holds rows r0.. (gT[(r - r0) * NB + t]).
template <typename acc_t, int NB, int W>
PPF_INLINE void sddmm_block(const int64_t* ptr, const int64_t* col, int64_t r0, int64_t r1,
                            const acc_t* gT, const acc_t* xT, acc_t* partial, acc_t* parked) {
  using V = Lanes<acc_t, NB>;
  const LoadLanes<acc_t, NB> load{xT};
  FoldSink<acc_t, NB, W> sink{parked, ptr[r0]};
  for (int64_t r = r0; r < r1; ++r) {
    if (ptr[r] == ptr[r + 1]) continue;
    csr_row_sddmm<V>(ptr, col, r, V::load(gT + (r - r0) * NB), load, sink);
  }
  sink.flush(ptr[r1], partial);
}

}  // namespace

// The ISA-cloned hot loops: one symbol per accumulation dtype and vector width (see
// PPF_CPU_CLONES), and an overload per width that calls it.
#define PPF_SPARSE_BLOCKS(acc_t, suffix, VB)                                                      \
  PPF_WIDTH_CLONE(VB, spmm_block_##suffix##_##VB, spmm_block_isa,                                 \
                  (const int64_t* ptr, const int64_t* col, const acc_t* val, int64_t R,            \
                   const acc_t* xT, acc_t* yT),                                                    \
                  (ptr, col, val, R, xT, yT),                                                      \
                  (spmm_block<acc_t, Blocking<acc_t, VB>::W, Blocking<acc_t, VB>::kSpmmVectors>))  \
  PPF_WIDTH_CLONE(VB, sddmm_block_##suffix##_##VB, sddmm_block_isa,                               \
                  (const int64_t* ptr, const int64_t* col, int64_t r0, int64_t r1,                 \
                   const acc_t* gT, const acc_t* xT, acc_t* partial, acc_t* parked),               \
                  (ptr, col, r0, r1, gT, xT, partial, parked),                                     \
                  (sddmm_block<acc_t, Blocking<acc_t, VB>::kSddmm, Blocking<acc_t, VB>::W>))

PPF_SPARSE_BLOCKS(float, f32, 64)
PPF_SPARSE_BLOCKS(float, f32, 32)
PPF_SPARSE_BLOCKS(double, f64, 64)
PPF_SPARSE_BLOCKS(double, f64, 32)
#undef PPF_SPARSE_BLOCKS

// Tiled transposes between token-major activations and the token-blocked buffers, compiled per
// ISA and width: W x W tiles (W = one VB-byte vector of acc_t) loaded as W rows, transposed in
// registers (transpose_square), stored as W columns. Edges fall back to scalar loops.
namespace {

template <typename x_t, typename acc_t, int W>
PPF_INLINE void load_t_impl(const x_t* x, int64_t s0, int64_t s1, int64_t n0, int64_t nb, int64_t c0,
                            int64_t c1, acc_t* xT, int64_t NB) {
  using VW = Lanes<acc_t, W>;
  const x_t* base = x + n0 * s0;
  if (s0 == 1) {  // x is a transposed view: each column's nb tokens are contiguous, a plain copy
    for (int64_t cc = c0; cc < c1; ++cc) {
      acc_t* dst = xT + (cc - c0) * NB;
      const x_t* src = base + cc * s1;
      for (int64_t t = 0; t < nb; ++t) dst[t] = static_cast<acc_t>(src[t]);
      for (int64_t t = nb; t < NB; ++t) dst[t] = acc_t(0);
    }
    return;
  }
  const int64_t tfull = s1 == 1 ? nb / W * W : 0;
  // token tile outer, columns inner: W source rows are streamed sequentially (prefetch-friendly)
  const int64_t cfull = tfull > 0 ? c0 + (c1 - c0) / W * W : c0;
  for (int64_t t0 = 0; t0 < tfull; t0 += W) {
    for (int64_t c = c0; c < cfull; c += W) {
      VW tile[W];
      for (int i = 0; i < W; ++i) {
        const x_t* src = base + (t0 + i) * s0 + c;
        acc_t tmp[W];
        for (int j = 0; j < W; ++j) tmp[j] = static_cast<acc_t>(src[j]);
        tile[i] = VW::load(tmp);
      }
      transpose_square<acc_t, W>(tile);
      for (int j = 0; j < W; ++j) tile[j].store(xT + (c - c0 + j) * NB + t0);
    }
  }
  // scalar edges: columns past the last full tile, tokens past the last full tile, padding
  for (int64_t cc = c0; cc < c1; ++cc) {
    acc_t* dst = xT + (cc - c0) * NB;
    const int64_t tstart = cc < cfull ? tfull : 0;
    for (int64_t t = tstart; t < nb; ++t) dst[t] = static_cast<acc_t>(base[t * s0 + cc * s1]);
    for (int64_t t = nb; t < NB; ++t) dst[t] = acc_t(0);
  }
}

// out[n0 + t, r] = out[n0 + t, r] + yT[r, t] (summed in acc_t, rounded once), t < nb, r < R.
template <typename o_t, typename acc_t, int W>
PPF_INLINE void store_t_acc_impl(o_t* out, int64_t s0, int64_t s1, int64_t n0, int64_t nb, int64_t R,
                                 const acc_t* yT, int64_t NB) {
  using VW = Lanes<acc_t, W>;
  o_t* base = out + n0 * s0;
  if (s0 == 1) {  // out is a transposed view: row r's nb tokens are contiguous, a plain add
    for (int64_t rr = 0; rr < R; ++rr) {
      o_t* dst = base + rr * s1;
      const acc_t* yr = yT + rr * NB;
      for (int64_t t = 0; t < nb; ++t) dst[t] = static_cast<o_t>(static_cast<acc_t>(dst[t]) + yr[t]);
    }
    return;
  }
  const int64_t tfull = s1 == 1 ? nb / W * W : 0;
  int64_t r = 0;
  for (; r + W <= R && tfull > 0; r += W) {
    for (int64_t t0 = 0; t0 < tfull; t0 += W) {
      VW tile[W];
      for (int i = 0; i < W; ++i) tile[i] = VW::load(yT + (r + i) * NB + t0);
      transpose_square<acc_t, W>(tile);  // tile[j] = yT[r .. r+W, t0 + j]
      for (int j = 0; j < W; ++j) {
        o_t* dst = base + (t0 + j) * s0 + r;
        acc_t tmp[W];
        tile[j].store(tmp);
        for (int i = 0; i < W; ++i) dst[i] = static_cast<o_t>(static_cast<acc_t>(dst[i]) + tmp[i]);
      }
    }
  }
  for (int64_t rr = 0; rr < R; ++rr) {
    const acc_t* yr = yT + rr * NB;
    const int64_t tstart = rr < r ? tfull : 0;
    for (int64_t t = tstart; t < nb; ++t) {
      o_t& o = base[t * s0 + rr * s1];
      o = static_cast<o_t>(static_cast<acc_t>(o) + yr[t]);
    }
  }
}

}  // namespace

#define PPF_TRANSPOSERS_AT(x_t, acc_t, suffix, VB)                                              \
  PPF_WIDTH_CLONE(VB, load_t_##suffix##_##VB, load_t,                                              \
                  (const x_t* x, int64_t s0, int64_t s1, int64_t n0, int64_t nb, int64_t c0,       \
                   int64_t c1, acc_t* xT, int64_t NB),                                             \
                  (x, s0, s1, n0, nb, c0, c1, xT, NB),                                             \
                  (load_t_impl<x_t, acc_t, Blocking<acc_t, VB>::W>))                              \
  PPF_WIDTH_CLONE(VB, store_t_acc_##suffix##_##VB, store_t_acc,                                    \
                  (x_t* out, int64_t s0, int64_t s1, int64_t n0, int64_t nb, int64_t R,            \
                   const acc_t* yT, int64_t NB),                                                   \
                  (out, s0, s1, n0, nb, R, yT, NB),                                                \
                  (store_t_acc_impl<x_t, acc_t, Blocking<acc_t, VB>::W>))
#define PPF_TRANSPOSERS(x_t, acc_t, suffix)                                                      \
  PPF_TRANSPOSERS_AT(x_t, acc_t, suffix, 64)                                                     \
  PPF_TRANSPOSERS_AT(x_t, acc_t, suffix, 32)

// One instantiation per (storage dtype, accumulation dtype) pair the ops use, at both widths.
PPF_TRANSPOSERS(float, float, f32)
PPF_TRANSPOSERS(c10::BFloat16, float, bf16)
PPF_TRANSPOSERS(c10::Half, float, f16)
PPF_TRANSPOSERS(double, double, f64)
PPF_TRANSPOSERS(float, double, f32_f64)
PPF_TRANSPOSERS(c10::BFloat16, double, bf16_f64)
PPF_TRANSPOSERS(c10::Half, double, f16_f64)
PPF_TRANSPOSERS(double, float, f64_f32)
#undef PPF_TRANSPOSERS_AT
#undef PPF_TRANSPOSERS

namespace {

// On the CPU the index contents are checked too (O(rows + nnz), negligible next to O(n·nnz)):
// row_ptr starts at 0, never decreases and ends at nnz; every col lies in [0, n_cols).
void check_csr_contents(const char* op, const at::Tensor& row_ptr_, const at::Tensor& col_,
                        int64_t n_cols) {
  const at::Tensor row_ptr = row_ptr_.contiguous(), col = col_.contiguous();
  const int64_t* p = row_ptr.data_ptr<int64_t>();
  const int64_t R = row_ptr.numel() - 1, nnz = col.numel();
  PPF_CHECK(op, p[R] == nnz, "row_ptr ends at ", p[R], " but col has ", nnz, " entries");
  PPF_CHECK(op, p[0] == 0, "row_ptr starts at ", p[0], "; expected 0");
  for (int64_t r = 0; r < R; ++r)
    PPF_CHECK(op, p[r] <= p[r + 1], "row_ptr decreases at row ", r, " (", p[r], " > ", p[r + 1], ")");
  const int64_t* c = col.data_ptr<int64_t>();
  for (int64_t k = 0; k < nnz; ++k)
    PPF_CHECK(op, c[k] >= 0 && c[k] < n_cols, "col[", k, "] = ", c[k], " is outside [0, ", n_cols,
              ") (S has ", n_cols, " columns)");
}

}  // namespace

// out (n, R) += x (n, C) · Sᵀ, S (R, C) in CSR with values in the accumulation dtype.
void sparse_spmm_csr_t_acc_cpu(at::Tensor& out, const at::Tensor& row_ptr_, const at::Tensor& col_,
                               const at::Tensor& val_, const at::Tensor& x) {
  static constexpr const char* op = "sparse_spmm_csr_t_acc";
  const int64_t C = x.dim() == 2 ? x.size(1) : -1;
  check_spmm_args(op, row_ptr_, col_, val_, C, x);
  check_csr_contents(op, row_ptr_, col_, C);
  const int64_t R = row_ptr_.numel() - 1, n = x.size(0);
  check_spmm_out(op, out, n, R, x);
  if (n == 0 || R == 0 || col_.numel() == 0) return;
  const at::Tensor row_ptr = row_ptr_.contiguous(), col = col_.contiguous(), val = val_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "sparse_spmm_csr_t_acc", [&] {
    using acc_t = scalar_t;
    const acc_t* v = val.data_ptr<acc_t>();
    const int64_t* p = row_ptr.data_ptr<int64_t>();
    const int64_t* c = col.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "spmm_x", [&] {
      using x_t = scalar_t;
      const x_t* xp = x.data_ptr<x_t>();
      const int64_t xs0 = x.stride(0), xs1 = x.stride(1);
      {
        using o_t = x_t;  // out has x's dtype (checked)
        o_t* op_ = out.data_ptr<o_t>();
        const int64_t os0 = out.stride(0), os1 = out.stride(1);
        with_cpu_width([&](auto width) {
          constexpr int NB = Blocking<acc_t, decltype(width)::value>::kSpmm;
          const int64_t blocks = (n + NB - 1) / NB;
          at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
            std::vector<acc_t> xT(C * NB), yT(R * NB);
            for (int64_t b = b0; b < b1; ++b) {
              const int64_t n0 = b * NB, nb = std::min<int64_t>(NB, n - n0);
              load_t(width, xp, xs0, xs1, n0, nb, 0, C, xT.data(), NB);
              spmm_block_isa(width, p, c, v, R, xT.data(), yT.data());
              store_t_acc(width, op_, os0, os1, n0, nb, R, yT.data(), NB);
            }
          });
        });
      }
    });
  });
}

at::Tensor sparse_spmm_csr_t_cpu(const at::Tensor& row_ptr, const at::Tensor& col,
                                 const at::Tensor& val, int64_t n_cols, const at::Tensor& x) {
  static constexpr const char* op = "sparse_spmm_csr_t";
  check_spmm_args(op, row_ptr, col, val, n_cols, x);
  // The functional form: x converted to val's dtype, accumulated into zeros of that dtype.
  const at::Tensor xa = x.to(val.scalar_type());
  at::Tensor out = at::zeros({x.size(0), row_ptr.numel() - 1}, xa.options());
  sparse_spmm_csr_t_acc_cpu(out, row_ptr, col, val, xa);
  return out;
}

// out[k] = Σₙ a[n, row_k] · b[n, col_k] for the CSR entries k; a: (n, R), b: (n, C).
at::Tensor sparse_sddmm_csr_cpu(const at::Tensor& row_ptr_, const at::Tensor& col_,
                                const at::Tensor& a, const at::Tensor& b) {
  static constexpr const char* op = "sparse_sddmm_csr";
  check_sddmm_args(op, row_ptr_, col_, a, b);
  check_csr_contents(op, row_ptr_, col_, b.size(1));
  const int64_t R = row_ptr_.numel() - 1, n = a.size(0), C = b.size(1), nnz = col_.numel();
  const bool f64 = a.scalar_type() == at::kDouble;
  at::Tensor out = at::zeros({nnz}, a.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (nnz == 0 || n == 0) return out;
  const at::Tensor row_ptr = row_ptr_.contiguous(), col = col_.contiguous();
  const int64_t* p = row_ptr.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sparse_sddmm_csr", [&] {
    using acc_t = scalar_t;
    const int nthreads = at::get_num_threads();
    // One partial sum per thread (deterministic for a given thread count), reduced at the end.
    std::vector<acc_t> partial(static_cast<size_t>(nthreads) * nnz, acc_t(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "sddmm_a", [&] {
      using a_t = scalar_t;
      const a_t* ap = a.data_ptr<a_t>();
      {
        using b_t = a_t;  // same dtype (checked)
        const b_t* bp = b.data_ptr<b_t>();
        with_cpu_width([&](auto width) {
          using Blk = Blocking<acc_t, decltype(width)::value>;
          constexpr int NB = Blk::kSddmm;
          const int64_t blocks = (n + NB - 1) / NB;
          at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
            std::vector<acc_t> gT(R * NB), xT(C * NB), parked;
            const int tid = at::get_thread_num();
            TORCH_INTERNAL_ASSERT(tid < nthreads);
            acc_t* mine = partial.data() + static_cast<size_t>(tid) * nnz;
            for (int64_t blk = b0; blk < b1; ++blk) {
              const int64_t n0 = blk * NB, nb = std::min<int64_t>(NB, n - n0);
              load_t(width, bp, b.stride(0), b.stride(1), n0, nb, 0, C, xT.data(), NB);
              load_t(width, ap, a.stride(0), a.stride(1), n0, nb, 0, R, gT.data(), NB);
              for (int64_t r0 = 0; r0 < R; r0 += kSddmmRowChunk) {
                const int64_t r1 = std::min<int64_t>(R, r0 + kSddmmRowChunk);
                const size_t need = static_cast<size_t>(p[r1] - p[r0]) * Blk::W;
                if (parked.size() < need) parked.resize(need);
                sddmm_block_isa(width, p, c, r0, r1, gT.data() + r0 * NB, xT.data(), mine,
                                parked.data());
              }
            }
          });
        });
      }
    });
    // Serial: nthreads·nnz adds (tens of µs) cost less than waking the pool a second time.
    acc_t* o = out.data_ptr<acc_t>();
    for (int t = 0; t < nthreads; ++t) {
      const acc_t* src = partial.data() + static_cast<size_t>(t) * nnz;
      for (int64_t k = 0; k < nnz; ++k) o[k] += src[k];
    }
  });
  return out;
}

}  // namespace pypeft_fast
