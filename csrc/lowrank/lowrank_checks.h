// Argument checks of the fused low-rank dropout ops, shared by the CPU and CUDA launchers
// (lowrank_cpu.cpp, lowrank_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../common/checks.h"
#include "../philox/philox_checks.h"

namespace pypeft_fast {

// u = drop(x)·Aᵀ
inline void check_lowrank_down_args(const char* op, const at::Tensor& x, const at::Tensor& A,
                            const at::Tensor& seed, double p) {
  check_dim(op, "x", x, 2);
  check_dim(op, "A", A, 2);
  check_floating(op, "x", x);
  check_acc(op, "A", A);
  check_seed(op, seed);
  check_p(op, p);
  PPF_CHECK(op, A.size(1) == x.size(1), "A has shape ", A.sizes(), " but x has shape ", x.sizes(),
            "; expected A: (r, ", x.size(1), ")");
  check_same_device(op, "A", A, "x", x);
}

// dx += drop(t·A), dA = tᵀ·drop(x); returns whether dx is given
inline bool check_lowrank_bwd_args(const char* op, const at::Tensor& t, const at::Tensor& x,
                           const at::Tensor& A, const at::Tensor& seed, double p,
                           const std::optional<at::Tensor>& dx) {
  check_dim(op, "t", t, 2);
  check_dim(op, "x", x, 2);
  check_dim(op, "A", A, 2);
  check_acc(op, "t", t);
  check_floating(op, "x", x);
  check_dtype(op, "A", A, t.scalar_type());
  check_seed(op, seed);
  check_p(op, p);
  const int64_t n = x.size(0), k = x.size(1), r = A.size(0);
  PPF_CHECK(op, A.size(1) == k, "A has shape ", A.sizes(), " but x has shape ", x.sizes(),
            "; expected A: (r, ", k, ")");
  PPF_CHECK(op, t.size(0) == n && t.size(1) == r, "t has shape ", t.sizes(), "; expected (", n,
            ", ", r, ") for x ", x.sizes(), " and A ", A.sizes());
  check_same_device(op, "t", t, "x", x);
  check_same_device(op, "A", A, "x", x);
  const bool has_dx = dx.has_value() && dx->defined();
  if (has_dx) {
    PPF_CHECK(op, dx->dim() == 2 && dx->size(0) == n && dx->size(1) == k, "dx has shape ",
              dx->sizes(), "; expected (", n, ", ", k, ") like x");
    PPF_CHECK(op, dx->scalar_type() == x.scalar_type(), "dx has dtype ", dx->scalar_type(),
              " but x has ", x.scalar_type(), "; expected the same");
    check_same_device(op, "dx", *dx, "x", x);
  }
  return has_dx;
}

}  // namespace pypeft_fast
