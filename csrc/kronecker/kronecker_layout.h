// Host-side layouts and argument checks shared by the CPU and CUDA launchers of kronecker.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../common/checks.h"
#include "kronecker_body.h"

namespace pypeft_fast {

// Ar[(i,h), j] = A[h,i,j]: the h Kronecker terms' A stacked as (ao·h × ai) rows.
inline at::Tensor stacked_rows(const at::Tensor& A) {
  return A.permute({1, 0, 2}).reshape({A.size(0) * A.size(1), A.size(2)}).contiguous();
}

// The checks of kronecker_apply_acc (y += x·ΔWᵀ).
inline KronShape check_kron_fwd_args(const char* op, const at::Tensor& y, const at::Tensor& x,
                                     const at::Tensor& A, const at::Tensor& B) {
  const KronShape s = check_kron_args(op, x, A, B);
  check_kron_out(op, "y", y, x.size(0), s.out(), x);
  return s;
}

// The checks of kronecker_apply_bwd; has_dx says whether dx was given.
inline KronShape check_kron_bwd_args(const char* op, const at::Tensor& gy, const at::Tensor& x,
                                     const at::Tensor& A, const at::Tensor& B,
                                     const std::optional<at::Tensor>& dx, bool& has_dx) {
  const KronShape s = check_kron_args(op, x, A, B);
  check_kron_out(op, "gy", gy, x.size(0), s.out(), x);
  has_dx = dx.has_value() && dx->defined();
  if (has_dx) check_kron_out(op, "dx", *dx, x.size(0), s.in(), x);
  return s;
}

}  // namespace pypeft_fast
