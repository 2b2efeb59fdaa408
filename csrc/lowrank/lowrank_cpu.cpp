// CPU launchers of the fused low-rank dropout path. The mask (csrc/philox/philox_cpu.h) is
// generated a block of rows at a time into a thread-local multiplier buffer (scale or 0 per
// element, cache-sized) and consumed while the block is hot:
//   lowrank_dropout_down:  u[rows]  = (x[rows] ⊙ m / (1-p)) · Aᵀ            (x read once)
//   lowrank_dropout_bwd:   dx[rows] += (t[rows] · A) ⊙ m / (1-p)              (in place)
//                          dA      += t[rows]ᵀ · (x[rows] ⊙ m / (1-p))        (one mask for both)
// The products are skinny_mm.h's (drop(x)·Aᵀ, and t·A with the mask applied as it is added to dx)
// and skinny_t_mm's (the token sum tᵀ·(…), skinny_t_mm.h);
// the Philox loop is compiled per ISA (PPF_CPU_CLONES).
// At p = 0 no mask is made: the same ops are then the products of an activation in its own dtype
// (bf16/fp16 under autocast) with float32 factors, converted a block of rows at a time in cache
// (pypeft_fast/native.py routes the mixed-dtype rank products here).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/macros.h"
#include "../common/rows.h"
#include "../ops.h"
#include "../philox/philox.h"
#include "../philox/philox_cpu.h"
#include "lowrank_checks.h"
#include "skinny_mm.h"
#include "skinny_t_mm.h"

namespace pypeft_fast {
namespace {

// Rows per block: kBlockElements elements per operand block, at least 8 rows. Fewer, larger blocks
// amortise the per-block GEMM call, whose packing of A is repeated per call (measured: 16-row
// blocks cost 2x the mask itself).
#ifndef PPF_LOWRANK_BLOCK_ELEMENTS
#define PPF_LOWRANK_BLOCK_ELEMENTS 65536
#endif
constexpr int64_t kBlockElements = PPF_LOWRANK_BLOCK_ELEMENTS;
int64_t rows_per_block(int64_t k, int64_t min_rows = 8) {
  return std::max<int64_t>(min_rows, kBlockElements / std::max<int64_t>(k, 1));
}
// The backward's blocks hold at least this many rows: each block also adds its t·ᵀ(x ⊙ m) into the
// thread's r × in partial dA, and 23-row blocks (65536 elements at in = 2752) spent more on that
// partial than on the product (1-thread op at in = 2752: 6.4 ms; 4.8 with 64 rows).
constexpr int64_t kBwdMinRows = 64;

// p as an acc_t* when x_t is acc_t, else nullptr (the dispatch lambdas are no templates, so an
// `if constexpr` there would still compile both branches).
template <typename acc_t, typename x_t>
acc_t* same_dtype(x_t* p) {
  if constexpr (std::is_same_v<x_t, acc_t>) return p;
  else return nullptr;
}

// d[i, :] = x[i, :] ⊙ m[i, :] for a block of rows (x's rows unit-stride): drop(x) in cache;
// m nullptr (p = 0): x converted to acc_t.
template <typename acc_t, typename x_t>
PPF_INLINE void dropped_rows(const x_t* x, int64_t x0, int64_t rows, int64_t k, const acc_t* m,
                             acc_t* d) {
  for (int64_t i = 0; i < rows; ++i) {
    const x_t* xr = x + i * x0;
    if (m == nullptr) {
      for (int64_t j = 0; j < k; ++j) d[i * k + j] = static_cast<acc_t>(xr[j]);
    } else {
      for (int64_t j = 0; j < k; ++j) d[i * k + j] = static_cast<acc_t>(xr[j]) * m[i * k + j];
    }
  }
}

// dx[i, :] += z[i, :] ⊙ m[i, :] (m nullptr: + z), summed in acc_t and rounded once (dx's rows
// unit-stride).
template <typename acc_t, typename x_t>
PPF_INLINE void masked_add_rows(x_t* dx, int64_t d0, int64_t rows, int64_t k, const acc_t* m,
                                const acc_t* z) {
  for (int64_t i = 0; i < rows; ++i) {
    x_t* dr = dx + i * d0;
    if (m == nullptr) {
      for (int64_t j = 0; j < k; ++j)
        dr[j] = static_cast<x_t>(static_cast<acc_t>(dr[j]) + z[i * k + j]);
    } else {
      for (int64_t j = 0; j < k; ++j)
        dr[j] = static_cast<x_t>(static_cast<acc_t>(dr[j]) + z[i * k + j] * m[i * k + j]);
    }
  }
}

// The multipliers of rows [e0, e0 + count) of the flat index, or nullptr at p = 0 (no mask: the
// ops are then the plain products with x, dx in their own dtype, read and written in place).
template <typename acc_t>
PPF_INLINE const acc_t* block_mask(bool masked, int64_t e0, int64_t count, const PhiloxKey& key,
                                   uint32_t thr, acc_t scale, Scratch<acc_t>& buf) {
  return masked ? mult_range<acc_t>(e0, count, key, thr, scale, buf) : nullptr;
}

}  // namespace

// The row loops compiled per ISA (vectorised over unit-stride rows).
#define PPF_DROPPED_PARAMS(acc_t, x_t) \
  (const x_t* x, int64_t x0, int64_t rows, int64_t k, const acc_t* m, acc_t* d)
#define PPF_MASKED_ADD_PARAMS(acc_t, x_t) \
  (x_t * dx, int64_t d0, int64_t rows, int64_t k, const acc_t* m, const acc_t* z)
PPF_ACC_X_CLONES(dropped_rows, PPF_DROPPED_PARAMS, (x, x0, rows, k, m, d))
PPF_ACC_X_CLONES(masked_add_rows, PPF_MASKED_ADD_PARAMS, (dx, d0, rows, k, m, z))

// u = drop(x) · Aᵀ; x: (n, in) any float dtype, A: (r, in) float32/float64 → u: (n, r) A's dtype.
at::Tensor lowrank_dropout_down_cpu(const at::Tensor& x, const at::Tensor& A,
                                    const at::Tensor& seed, double p) {
  static constexpr const char* op = "lowrank_dropout_down";
  check_lowrank_down_args(op, x, A, seed, p);
  const int64_t n = x.size(0), k = x.size(1), r = A.size(0);
  at::Tensor u = at::empty({n, r}, A.options());
  if (n == 0) return u;
  if (k == 0) return u.zero_();
  const PhiloxKey key = philox_key(seed_value(seed));
  const uint32_t thr = keep_threshold(p);
  // Detached: the worker threads of at::parallel_for do not inherit the caller's grad mode, and
  // the GEMMs below must never record autograd history (the op has no autograd formula).
  const at::Tensor At = A.detach().t().contiguous();  // (in, r): skinny_mm's b
  const at::Tensor xc = unit_rows(x);
  // At most n rows: the per-thread buffers are RB·k values (n ≥ 1 here).
  const int64_t RB = std::min(rows_per_block(k), n), blocks = (n + RB - 1) / RB;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    const acc_t scale = dropout_scale<acc_t>(p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
      using x_t = scalar_t;
      const x_t* xp = xc.const_data_ptr<x_t>();
      const int64_t s0 = xc.stride(0);
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        Scratch<acc_t> mbuf;
        std::vector<acc_t> xd(RB * k);
        const acc_t* atp = At.const_data_ptr<acc_t>();
        acc_t* up = u.data_ptr<acc_t>();
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * RB, rows = std::min<int64_t>(RB, n - r0);
          const acc_t* m = block_mask<acc_t>(p > 0.0, r0 * k, rows * k, key, thr, scale, mbuf);
          dropped_rows_isa(xp + r0 * s0, s0, rows, k, m, xd.data());
          skinny_mm_acc(xd.data(), k, atp, r, rows, k, r, up + r0 * r, r, false);
        }
      });
    });
  });
  return u;
}

// dx += drop(t · A) in place (when dx is given) and returns dA = tᵀ · drop(x) (when need_dA,
// else an empty (0,) tensor). t: (n, r), A: (r, in) in the accumulation dtype; x, dx: (n, in).
at::Tensor lowrank_dropout_bwd_cpu(const at::Tensor& t_, const at::Tensor& x, const at::Tensor& A_,
                                   const at::Tensor& seed, double p,
                                   const std::optional<at::Tensor>& dx_opt, bool need_dA) {
  static constexpr const char* op = "lowrank_dropout_bwd";
  const bool has_dx = check_lowrank_bwd_args(op, t_, x, A_, seed, p, dx_opt);
  // Detached (see lowrank_dropout_down_cpu): no autograd inside the worker threads; t's rows
  // unit-stride for skinny_t_mm_acc.
  const at::Tensor t = t_.detach().contiguous(), A = unit_rows(A_.detach());
  const int64_t n = x.size(0), k = x.size(1), r = A.size(0);
  const int nthreads = at::get_num_threads();
  at::Tensor partial = need_dA ? at::zeros({nthreads, r, k}, A.options()) : at::Tensor();
  // The row loops take unit-stride rows: a strided x is read from a copy, a strided dx updated
  // in one and copied back.
  const at::Tensor xc = unit_rows(x);
  at::Tensor dxc = has_dx ? unit_rows(*dx_opt) : at::Tensor();
  if (n > 0 && k > 0 && (has_dx || need_dA)) {
    const PhiloxKey key = philox_key(seed_value(seed));
    const uint32_t thr = keep_threshold(p);
    const int64_t RB = std::min(rows_per_block(k, kBwdMinRows), n), blocks = (n + RB - 1) / RB;
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), op, [&] {
      using acc_t = scalar_t;
      const acc_t scale = dropout_scale<acc_t>(p);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
        using x_t = scalar_t;
        const x_t* xp = xc.const_data_ptr<x_t>();
        const int64_t s0 = xc.stride(0);
        x_t* dxp = has_dx ? dxc.data_ptr<x_t>() : nullptr;
        const int64_t d0 = has_dx ? dxc.stride(0) : 0;
        const acc_t* tp = t.const_data_ptr<acc_t>();
        const acc_t* Ap = A.const_data_ptr<acc_t>();
        const int64_t sA = A.stride(0);
        acc_t* pp = need_dA ? partial.data_ptr<acc_t>() : nullptr;
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          Scratch<acc_t> mbuf;
          std::vector<acc_t> buf(RB * k);
          const int tid = at::get_thread_num();
          TORCH_INTERNAL_ASSERT(tid < nthreads);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t r0 = b * RB, rows = std::min<int64_t>(RB, n - r0);
            const acc_t* m = block_mask<acc_t>(p > 0.0, r0 * k, rows * k, key, thr, scale, mbuf);
            if (has_dx) {  // dx[rows] += (t[rows] · A) ⊙ m, summed in acc_t and rounded once
              if (acc_t* dxa = same_dtype<acc_t>(dxp)) {
                rank_update_acc(tp + r0 * r, r, Ap, sA, m, k, rows, r, k, dxa + r0 * d0, d0, true);
              } else {  // via buf = t[rows] · A
                rank_update_acc(tp + r0 * r, r, Ap, sA, nullptr, 0, rows, r, k, buf.data(), k, false);
                masked_add_rows_isa(dxp + r0 * d0, d0, rows, k, m, buf.data());
              }
            }
            if (need_dA) {  // buf = x[rows] ⊙ m; partial[tid] += t[rows]ᵀ · buf
              dropped_rows_isa(xp + r0 * s0, s0, rows, k, m, buf.data());
              skinny_t_mm_acc(tp + r0 * r, r, buf.data(), k, rows, r, k, pp + tid * r * k, k, true);
            }
          }
        });
      });
    });
  }
  if (has_dx && !dxc.is_same(*dx_opt)) dx_opt->copy_(dxc);
  if (!need_dA) return at::empty({0}, A.options());
  return partial.sum(0);
}
}  // namespace pypeft_fast
