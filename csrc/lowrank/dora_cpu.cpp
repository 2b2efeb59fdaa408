// CPU kernels of DoRA's per-output-column scale (pypeft_fast/families/lowrank_dora.py):
//
//   dora_scale_epilogue:  y[i, j] = c_j · (y[i, j] + s · Σ_k u[i, k] · B[j, k]) + shift_j   (in place)
//       one pass over y: a block of rows of u · Bᵀ is formed in cache (ATen's GEMM) and folded
//       into y with the scale and shift, summed in u's dtype and rounded once to y's.
//   dora_grad_prologue:   g = c ⊙ gy (accumulation dtype), colsum_j = Σ_i gy[i, j],
//                         coldot_j = Σ_i gy[i, j] · y[i, j] (when y is given)
//       one pass over gy (and y) instead of three; column sums in per-thread partials.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/macros.h"
#include "../common/rows.h"
#include "../ops.h"

namespace pypeft_fast {
namespace {

constexpr int64_t kEpilogueBlockElements = 1 << 16;  // rows × out of one cached u·Bᵀ block
constexpr int64_t kSumBlockRows = 64;  // see dora_grad_prologue_cpu

int64_t epilogue_block_rows(int64_t out) {
  return std::max<int64_t>(1, kEpilogueBlockElements / std::max<int64_t>(out, 1));
}

void check_vector(const char* op, const char* arg, const at::Tensor& t, int64_t len,
                  const at::Tensor& acc) {
  check_dim(op, arg, t, 1);
  PPF_CHECK(op, t.size(0) == len, arg, " has shape ", t.sizes(), "; expected (", len, ",)");
  PPF_CHECK(op, t.scalar_type() == acc.scalar_type(), arg, " has dtype ", t.scalar_type(),
            "; expected ", acc.scalar_type(), " (the accumulation dtype)");
  check_same_device(op, arg, t, "the activations", acc);
}

// y[i, :] = c ⊙ (y[i, :] + s·t[i, :]) (+ shift) for rows of unit-stride y and the cached t = u·Bᵀ.
template <typename acc_t, typename y_t>
PPF_INLINE void epilogue_rows(y_t* y, int64_t y0, const acc_t* t, int64_t rows, int64_t out,
                              const acc_t* c, const acc_t* shift, acc_t s) {
  for (int64_t i = 0; i < rows; ++i) {
    y_t* yr = y + i * y0;
    const acc_t* tr = t + i * out;
    if (shift != nullptr) {
      for (int64_t j = 0; j < out; ++j)
        yr[j] = static_cast<y_t>(c[j] * (static_cast<acc_t>(yr[j]) + s * tr[j]) + shift[j]);
    } else {
      for (int64_t j = 0; j < out; ++j)
        yr[j] = static_cast<y_t>(c[j] * (static_cast<acc_t>(yr[j]) + s * tr[j]));
    }
  }
}

// For rows of unit-stride gy (and y): g = c ⊙ gy, bs += gy, bd += gy ⊙ y (when y is given).
template <typename acc_t, typename y_t>
PPF_INLINE void prologue_rows(const y_t* gy, int64_t g0, const y_t* y, int64_t s0, int64_t rows,
                              int64_t out, const acc_t* c, acc_t* g, acc_t* bs, acc_t* bd) {
  for (int64_t i = 0; i < rows; ++i) {
    const y_t* gr = gy + i * g0;
    acc_t* go = g + i * out;
    for (int64_t j = 0; j < out; ++j) {
      const acc_t v = static_cast<acc_t>(gr[j]);
      go[j] = c[j] * v;
      bs[j] += v;
    }
    if (y != nullptr) {
      const y_t* yr = y + i * s0;
      for (int64_t j = 0; j < out; ++j) bd[j] += static_cast<acc_t>(gr[j]) * static_cast<acc_t>(yr[j]);
    }
  }
}

}  // namespace

// The row loops compiled per ISA (vectorised: unit-stride rows; a strided y / gy is copied first).
#define PPF_EPILOGUE_PARAMS(acc_t, y_t)                                                       \
  (y_t * y, int64_t y0, const acc_t* t, int64_t rows, int64_t out, const acc_t* c,            \
   const acc_t* shift, acc_t s)
#define PPF_PROLOGUE_PARAMS(acc_t, y_t)                                                       \
  (const y_t* gy, int64_t g0, const y_t* y, int64_t s0, int64_t rows, int64_t out,            \
   const acc_t* c, acc_t* g, acc_t* bs, acc_t* bd)
PPF_ACC_X_CLONES(epilogue_rows, PPF_EPILOGUE_PARAMS, (y, y0, t, rows, out, c, shift, s))
PPF_ACC_X_CLONES(prologue_rows, PPF_PROLOGUE_PARAMS, (gy, g0, y, s0, rows, out, c, g, bs, bd))

void dora_scale_epilogue_cpu(at::Tensor& y, const at::Tensor& u_, const at::Tensor& B_,
                             double scaling, const at::Tensor& c_,
                             const std::optional<at::Tensor>& shift_) {
  static constexpr const char* op = "dora_scale_epilogue";
  check_dim(op, "y", y, 2);
  check_dim(op, "u", u_, 2);
  check_dim(op, "B", B_, 2);
  check_floating(op, "y", y);
  check_acc(op, "u", u_);
  const int64_t n = y.size(0), out = y.size(1), r = u_.size(1);
  PPF_CHECK(op, u_.size(0) == n, "u has shape ", u_.sizes(), "; expected (", n, ", r) to match y ",
            y.sizes());
  PPF_CHECK(op, B_.size(0) == out && B_.size(1) == r, "B has shape ", B_.sizes(), "; expected (",
            out, ", ", r, ")");
  check_dtype(op, "B", B_, u_.scalar_type());
  check_vector(op, "c", c_, out, u_);
  if (shift_.has_value()) check_vector(op, "shift", *shift_, out, u_);
  check_same_device(op, "u", u_, "y", y);
  if (n == 0 || out == 0) return;
  // Detached: at::parallel_for's workers do not inherit grad mode; no autograd in here.
  const at::Tensor u = u_.detach(), Bt = B_.detach().t(), c = c_.contiguous();
  const at::Tensor shift = shift_.has_value() ? shift_->contiguous() : at::Tensor();
  // At most n rows: each thread's buffer holds RB·out values.
  const int64_t RB = std::min(epilogue_block_rows(out), n), blocks = (n + RB - 1) / RB;
  // The row loops take unit-stride rows: a y with strided rows is worked on in a copy.
  at::Tensor yc = unit_rows(y);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    const acc_t s = static_cast<acc_t>(scaling);
    const acc_t* cp = c.data_ptr<acc_t>();
    const acc_t* hp = shift.defined() ? shift.data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), op, [&] {
      using y_t = scalar_t;
      y_t* yp = yc.data_ptr<y_t>();
      const int64_t y0 = yc.stride(0);
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<acc_t> buf(RB * out);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * RB, rows = std::min<int64_t>(RB, n - r0);
          at::Tensor tb = at::from_blob(buf.data(), {rows, out}, u.options());
          at::mm_out(tb, u.narrow(0, r0, rows), Bt);  // u[rows] · Bᵀ, in cache
          epilogue_rows_isa(yp + r0 * y0, y0, buf.data(), rows, out, cp, hp, s);
        }
      });
    });
  });
  if (!yc.is_same(y)) y.copy_(yc);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_grad_prologue_cpu(
    const at::Tensor& gy, const at::Tensor& c_, const std::optional<at::Tensor>& y_) {
  static constexpr const char* op = "dora_grad_prologue";
  check_dim(op, "gy", gy, 2);
  check_floating(op, "gy", gy);
  check_acc(op, "c", c_);
  const int64_t n = gy.size(0), out = gy.size(1);
  check_vector(op, "c", c_, out, c_);
  check_same_device(op, "c", c_, "gy", gy);
  const bool has_y = y_.has_value();
  if (has_y) {
    check_dim(op, "y", *y_, 2);
    PPF_CHECK(op, y_->sizes() == gy.sizes(), "y has shape ", y_->sizes(), "; expected ", gy.sizes(),
              " (gy's)");
    check_dtype(op, "y", *y_, gy.scalar_type());
  }
  const at::Tensor c = c_.contiguous();
  // The row loops take unit-stride rows (a strided gy or y is read from a copy).
  const at::Tensor gyc = unit_rows(gy);
  const at::Tensor yc = has_y ? unit_rows(*y_) : at::Tensor();
  at::Tensor g = at::empty({n, out}, c.options());
  const int nthreads = at::get_num_threads();
  at::Tensor parts = at::zeros({nthreads, has_y ? 2 : 1, out}, c.options());
  if (n > 0 && out > 0) {
    AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), op, [&] {
      using acc_t = scalar_t;
      const acc_t* cp = c.data_ptr<acc_t>();
      acc_t* gp = g.data_ptr<acc_t>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gy.scalar_type(), op, [&] {
        using y_t = scalar_t;
        const y_t* gyp = gyc.data_ptr<y_t>();
        const int64_t g0 = gyc.stride(0);
        const y_t* yp = has_y ? yc.data_ptr<y_t>() : nullptr;
        const int64_t s0 = has_y ? yc.stride(0) : 0;
        at::parallel_for(0, n, std::max<int64_t>(1, kEpilogueBlockElements / out), [&](int64_t i0, int64_t i1) {
          const int tid = at::get_thread_num();
          TORCH_INTERNAL_ASSERT(tid < nthreads);
          acc_t* cs = parts.data_ptr<acc_t>() + tid * (has_y ? 2 : 1) * out;
          acc_t* cd = cs + out;
          // Two-level sums: kSumBlockRows rows into a block partial, block partials into the
          // thread's — the rounding error grows with n / kSumBlockRows + kSumBlockRows, not n
          // (a plain running sum over 4096 rows exceeds the tolerance rule; torch's own column
          // sums are cascaded likewise).
          std::vector<acc_t> block((has_y ? 2 : 1) * out);
          acc_t* bs = block.data();
          acc_t* bd = has_y ? bs + out : nullptr;
          for (int64_t b0 = i0; b0 < i1; b0 += kSumBlockRows) {
            const int64_t b1 = std::min(i1, b0 + kSumBlockRows);
            std::fill(block.begin(), block.end(), acc_t(0));
            prologue_rows_isa(gyp + b0 * g0, g0, has_y ? yp + b0 * s0 : nullptr, s0, b1 - b0, out,
                              cp, gp + b0 * out, bs, bd);
            for (int64_t j = 0; j < out; ++j) cs[j] += bs[j];
            if (has_y)
              for (int64_t j = 0; j < out; ++j) cd[j] += bd[j];
          }
        });
      });
    });
  }
  const at::Tensor sums = parts.sum(0);
  at::Tensor colsum = sums.select(0, 0).clone();
  at::Tensor coldot = has_y ? sums.select(0, 1).clone() : at::empty({0}, c.options());
  return {g, colsum, coldot};
}

}  // namespace pypeft_fast
