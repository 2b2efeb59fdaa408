// Argument checks of the Kronecker / PHM ops, shared by the CPU and CUDA launchers
// (kronecker_cpu.cpp, kronecker_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../common/checks.h"
#include "kronecker_body.h"

namespace pypeft_fast {

// y = x·(s·Σₕ Aₕ ⊗ Bₕ)ᵀ with A (h, ao, ai), B (h, bo, bi) in the accumulation dtype, x (n, ai·bi).
inline KronShape check_kron_args(const char* op, const at::Tensor& x, const at::Tensor& A,
                                 const at::Tensor& B) {
  check_dim(op, "A", A, 3);
  check_dim(op, "B", B, 3);
  check_acc(op, "A", A);
  check_dtype(op, "B", B, A.scalar_type());
  PPF_CHECK(op, B.size(0) == A.size(0), "B has shape ", B.sizes(), " but A has shape ", A.sizes(),
            "; expected the same number of Kronecker terms h (dim 0)");
  const KronShape s{A.size(0), A.size(1), A.size(2), B.size(1), B.size(2)};
  check_dim(op, "x", x, 2);
  check_floating(op, "x", x);
  PPF_CHECK(op, x.size(1) == s.in(), "x has shape ", x.sizes(), "; expected (n, ", s.in(),
            ") = (n, A.size(2)·B.size(2)) for A ", A.sizes(), " and B ", B.sizes());
  check_same_device(op, "A", A, "x", x);
  check_same_device(op, "B", B, "x", x);
  return s;
}

// An (n, cols) activation-like argument of a Kronecker op (y, gy or dx).
inline void check_kron_out(const char* op, const char* arg, const at::Tensor& t, int64_t n,
                           int64_t cols, const at::Tensor& x) {
  check_dim(op, arg, t, 2);
  check_floating(op, arg, t);
  PPF_CHECK(op, t.size(0) == n && t.size(1) == cols, arg, " has shape ", t.sizes(), "; expected (",
            n, ", ", cols, ") for x ", x.sizes());
  check_same_device(op, arg, t, "x", x);
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
