// CPU launchers of the sparse family: SpMM (x·Sᵀ, accumulated into an output) and SDDMM.
//
// Both work on blocks of NB tokens transposed into a thread-local buffer xT (C, NB) in the
// accumulation dtype, so that one CSR entry is one NB-wide vector FMA (csr_row_apply with
// Vec = Lanes<acc_t, NB>) instead of NB scalar gathers. The hot loops are plain functions
// compiled per ISA (PPF_CPU_CLONES); the loads/stores around them convert dtypes.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "../common/checks.h"
#include "../common/lanes.h"
#include "../ops.h"
#include "sparse_body.h"

namespace pypeft_fast {
namespace {

// Tokens per block: one 64-byte vector for SpMM, four for SDDMM (a lane sum per entry is
// amortised over more tokens).
template <typename acc_t> struct Blocking;
template <> struct Blocking<float> { static constexpr int kSpmm = 16, kSddmm = 128; };
template <> struct Blocking<double> { static constexpr int kSpmm = 8, kSddmm = 64; };
// SDDMM transposes the left operand a chunk of CSR rows at a time (an L1-sized gT).
constexpr int64_t kSddmmRowChunk = 32;

template <typename acc_t, int NB>
struct LoadLanes {  // x(c) = xT[c, 0:NB]
  const acc_t* xT;
  PPF_HD Lanes<acc_t, NB> operator()(int64_t c) const { return Lanes<acc_t, NB>::load(xT + c * NB); }
};

// SDDMM sink: folds an entry's NB-token product to one vector of W lanes and parks it; flush()
// reduces W parked vectors at a time with transpose_sum and adds them to partial[k] as a vector.
template <typename acc_t, int NB>
struct FoldSink {
  static constexpr int W = 64 / sizeof(acc_t);  // one 64-byte vector
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

template <typename acc_t, int NB>
PPF_INLINE void spmm_block(const int64_t* ptr, const int64_t* col, const acc_t* val, int64_t R,
                       const acc_t* xT, acc_t* yT) {
  using V = Lanes<acc_t, NB>;
  const LoadLanes<acc_t, NB> load{xT};
  for (int64_t r = 0; r < R; ++r) csr_row_apply<V>(ptr, col, val, r, load).store(yT + r * NB);
}

// Rows [r0, r1) of one token block; gT holds rows r0.. (gT[(r - r0) * NB + t]).
template <typename acc_t, int NB>
PPF_INLINE void sddmm_block(const int64_t* ptr, const int64_t* col, int64_t r0, int64_t r1,
                            const acc_t* gT, const acc_t* xT, acc_t* partial, acc_t* parked) {
  using V = Lanes<acc_t, NB>;
  const LoadLanes<acc_t, NB> load{xT};
  FoldSink<acc_t, NB> sink{parked, ptr[r0]};
  for (int64_t r = r0; r < r1; ++r) {
    if (ptr[r] == ptr[r + 1]) continue;
    csr_row_sddmm<V>(ptr, col, r, V::load(gT + (r - r0) * NB), load, sink);
  }
  sink.flush(ptr[r1], partial);
}

}  // namespace

// The ISA-cloned hot loops (one symbol per accumulation dtype; see PPF_CPU_CLONES).
PPF_CPU_CLONES void spmm_block_f32(const int64_t* ptr, const int64_t* col, const float* val,
                                   int64_t R, const float* xT, float* yT) {
  spmm_block<float, Blocking<float>::kSpmm>(ptr, col, val, R, xT, yT);
}
PPF_CPU_CLONES void spmm_block_f64(const int64_t* ptr, const int64_t* col, const double* val,
                                   int64_t R, const double* xT, double* yT) {
  spmm_block<double, Blocking<double>::kSpmm>(ptr, col, val, R, xT, yT);
}
PPF_CPU_CLONES void sddmm_block_f32(const int64_t* ptr, const int64_t* col, int64_t r0,
                                    int64_t r1, const float* gT, const float* xT, float* partial,
                                    float* parked) {
  sddmm_block<float, Blocking<float>::kSddmm>(ptr, col, r0, r1, gT, xT, partial, parked);
}
PPF_CPU_CLONES void sddmm_block_f64(const int64_t* ptr, const int64_t* col, int64_t r0,
                                    int64_t r1, const double* gT, const double* xT,
                                    double* partial, double* parked) {
  sddmm_block<double, Blocking<double>::kSddmm>(ptr, col, r0, r1, gT, xT, partial, parked);
}

namespace {

inline void spmm_block_isa(const int64_t* p, const int64_t* c, const float* v, int64_t R,
                           const float* xT, float* yT) { spmm_block_f32(p, c, v, R, xT, yT); }
inline void spmm_block_isa(const int64_t* p, const int64_t* c, const double* v, int64_t R,
                           const double* xT, double* yT) { spmm_block_f64(p, c, v, R, xT, yT); }
inline void sddmm_block_isa(const int64_t* p, const int64_t* c, int64_t r0, int64_t r1,
                            const float* gT, const float* xT, float* o, float* parked) {
  sddmm_block_f32(p, c, r0, r1, gT, xT, o, parked);
}
inline void sddmm_block_isa(const int64_t* p, const int64_t* c, int64_t r0, int64_t r1,
                            const double* gT, const double* xT, double* o, double* parked) {
  sddmm_block_f64(p, c, r0, r1, gT, xT, o, parked);
}

// xT[c - c0, t] = x[n0 + t, c] for c in [c0, c1), t < nb; zero for nb <= t < NB.
// Column-outer order: the nb source rows stay in L1 while xT is written sequentially.
template <typename scalar_t, typename acc_t, int NB>
void load_block_t(const scalar_t* x, int64_t s0, int64_t s1, int64_t n0, int64_t nb, int64_t c0,
                  int64_t c1, acc_t* xT) {
  const scalar_t* base = x + n0 * s0;
  for (int64_t c = c0; c < c1; ++c) {
    acc_t* dst = xT + (c - c0) * NB;
    const scalar_t* src = base + c * s1;
    for (int64_t t = 0; t < nb; ++t) dst[t] = static_cast<acc_t>(src[t * s0]);
    for (int64_t t = nb; t < NB; ++t) dst[t] = acc_t(0);
  }
}

void check_row_ptr_end(const char* op, const at::Tensor& row_ptr, const at::Tensor& col) {
  const int64_t end = row_ptr[-1].item<int64_t>();
  PPF_CHECK(op, end == col.numel(), "row_ptr ends at ", end, " but col has ", col.numel(), " entries");
}

}  // namespace

// out (n, R) += x (n, C) · Sᵀ, S (R, C) in CSR with values in the accumulation dtype.
void sparse_spmm_csr_t_acc_cpu(at::Tensor& out, const at::Tensor& row_ptr_, const at::Tensor& col_,
                               const at::Tensor& val_, const at::Tensor& x) {
  static constexpr const char* op = "sparse_spmm_csr_t_acc";
  const int64_t C = x.dim() == 2 ? x.size(1) : -1;
  check_spmm_args(op, row_ptr_, col_, val_, C, x);
  check_row_ptr_end(op, row_ptr_, col_);
  const int64_t R = row_ptr_.numel() - 1, n = x.size(0);
  check_out(op, out, n, R, x);
  if (n == 0 || R == 0 || col_.numel() == 0) return;
  const at::Tensor row_ptr = row_ptr_.contiguous(), col = col_.contiguous(), val = val_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(val.scalar_type(), "sparse_spmm_csr_t_acc", [&] {
    using acc_t = scalar_t;
    constexpr int NB = Blocking<acc_t>::kSpmm;
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
        const int64_t blocks = (n + NB - 1) / NB;
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          std::vector<acc_t> xT(C * NB), yT(R * NB);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t n0 = b * NB, nb = std::min<int64_t>(NB, n - n0);
            load_block_t<x_t, acc_t, NB>(xp, xs0, xs1, n0, nb, 0, C, xT.data());
            spmm_block_isa(p, c, v, R, xT.data(), yT.data());
            o_t* ob = op_ + n0 * os0;
            for (int64_t r = 0; r < R; ++r) {  // row-outer: the nb output rows stay in L1
              const acc_t* yr = yT.data() + r * NB;
              for (int64_t t = 0; t < nb; ++t) {
                o_t& o = ob[t * os0 + r * os1];
                o = static_cast<o_t>(static_cast<acc_t>(o) + yr[t]);
              }
            }
          }
        });
      }
    });
  });
}

at::Tensor sparse_spmm_csr_t_cpu(const at::Tensor& row_ptr, const at::Tensor& col,
                                 const at::Tensor& val, int64_t n_cols, const at::Tensor& x) {
  static constexpr const char* op = "sparse_spmm_csr_t";
  check_spmm_args(op, row_ptr, col, val, n_cols, x);
  check_row_ptr_end(op, row_ptr, col);
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
  check_row_ptr_end(op, row_ptr_, col_);
  const int64_t R = row_ptr_.numel() - 1, n = a.size(0), C = b.size(1), nnz = col_.numel();
  const bool f64 = a.scalar_type() == at::kDouble;
  at::Tensor out = at::zeros({nnz}, a.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (nnz == 0 || n == 0) return out;
  const at::Tensor row_ptr = row_ptr_.contiguous(), col = col_.contiguous();
  const int64_t* p = row_ptr.data_ptr<int64_t>();
  const int64_t* c = col.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sparse_sddmm_csr", [&] {
    using acc_t = scalar_t;
    constexpr int NB = Blocking<acc_t>::kSddmm;
    const int64_t blocks = (n + NB - 1) / NB;
    const int nthreads = at::get_num_threads();
    // One partial sum per thread (deterministic for a given thread count), reduced at the end.
    std::vector<acc_t> partial(static_cast<size_t>(nthreads) * nnz, acc_t(0));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "sddmm_a", [&] {
      using a_t = scalar_t;
      const a_t* ap = a.data_ptr<a_t>();
      {
        using b_t = a_t;  // same dtype (checked)
        const b_t* bp = b.data_ptr<b_t>();
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          std::vector<acc_t> gT(kSddmmRowChunk * NB), xT(C * NB), parked;
          const int tid = at::get_thread_num();
          TORCH_INTERNAL_ASSERT(tid < nthreads);
          acc_t* mine = partial.data() + static_cast<size_t>(tid) * nnz;
          for (int64_t blk = b0; blk < b1; ++blk) {
            const int64_t n0 = blk * NB, nb = std::min<int64_t>(NB, n - n0);
            load_block_t<b_t, acc_t, NB>(bp, b.stride(0), b.stride(1), n0, nb, 0, C, xT.data());
            for (int64_t r0 = 0; r0 < R; r0 += kSddmmRowChunk) {
              const int64_t r1 = std::min<int64_t>(R, r0 + kSddmmRowChunk);
              load_block_t<a_t, acc_t, NB>(ap, a.stride(0), a.stride(1), n0, nb, r0, r1, gT.data());
              const size_t need = static_cast<size_t>(p[r1] - p[r0]) * (64 / sizeof(acc_t));
              if (parked.size() < need) parked.resize(need);
              sddmm_block_isa(p, c, r0, r1, gT.data(), xT.data(), mine, parked.data());
            }
          }
        });
      }
    });
    acc_t* o = out.data_ptr<acc_t>();
    at::parallel_for(0, nnz, 4096, [&](int64_t k0, int64_t k1) {
      for (int t = 0; t < nthreads; ++t) {
        const acc_t* src = partial.data() + static_cast<size_t>(t) * nnz;
        for (int64_t k = k0; k < k1; ++k) o[k] += src[k];
      }
    });
  });
  return out;
}

}  // namespace pypeft_fast
