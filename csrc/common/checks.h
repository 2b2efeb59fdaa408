// Argument checks at the op boundary: every message names the op, the argument and the shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

#include "../kronecker/kronecker_body.h"

#define PPF_CHECK(op, cond, ...) TORCH_CHECK((cond), "pypeft_fast::", op, ": ", __VA_ARGS__)

namespace pypeft_fast {

inline void check_dim(const char* op, const char* arg, const at::Tensor& t, int64_t dim) {
  PPF_CHECK(op, t.dim() == dim, arg, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype(const char* op, const char* arg, const at::Tensor& t, at::ScalarType want) {
  PPF_CHECK(op, t.scalar_type() == want, arg, " has dtype ", t.scalar_type(), "; expected ", want);
}

inline void check_floating(const char* op, const char* arg, const at::Tensor& t) {
  const auto s = t.scalar_type();
  PPF_CHECK(op, s == at::kFloat || s == at::kDouble || s == at::kBFloat16 || s == at::kHalf, arg,
            " has dtype ", s, "; expected float32, float64, bfloat16 or float16");
}

// The accumulation dtypes a kernel computes in: float32 or float64.
inline void check_acc(const char* op, const char* arg, const at::Tensor& t) {
  const auto s = t.scalar_type();
  PPF_CHECK(op, s == at::kFloat || s == at::kDouble, arg, " has dtype ", s,
            "; expected float32 or float64 (the accumulation dtype)");
}

inline void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                              const char* ref_arg, const at::Tensor& ref) {
  PPF_CHECK(op, t.device() == ref.device(), arg, " is on ", t.device(), " but ", ref_arg,
            " is on ", ref.device(), "; expected one device");
}

// CSR (row_ptr (R+1,), col (nnz,), val (nnz,)) of an R x C matrix. Indices are trusted beyond
// their shapes: the Python side validates them once, when it builds the layout of a mask.
inline int64_t check_csr(const char* op, const at::Tensor& row_ptr, const at::Tensor& col,
                         const at::Tensor* val) {
  check_dim(op, "row_ptr", row_ptr, 1);
  check_dim(op, "col", col, 1);
  check_dtype(op, "row_ptr", row_ptr, at::kLong);
  check_dtype(op, "col", col, at::kLong);
  PPF_CHECK(op, row_ptr.numel() >= 1, "row_ptr has shape ", row_ptr.sizes(),
            "; expected (rows + 1,) with at least one element");
  check_same_device(op, "col", col, "row_ptr", row_ptr);
  if (val != nullptr) {
    check_dim(op, "val", *val, 1);
    PPF_CHECK(op, val->numel() == col.numel(), "val has shape ", val->sizes(), " but col has shape ",
              col.sizes(), "; expected one value per stored entry");
    check_same_device(op, "val", *val, "row_ptr", row_ptr);
  }
  return row_ptr.numel() - 1;
}

inline void check_p(const char* op, double p) {
  PPF_CHECK(op, p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
}

inline void check_seed(const char* op, const at::Tensor& seed) {
  PPF_CHECK(op, seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
            "seed must be a 0-d int64 CPU tensor, got shape ", seed.sizes(), ", dtype ",
            seed.scalar_type(), ", device ", seed.device());
}


// x (n, C) · Sᵀ with S (R, C) in CSR: the shape checks shared by the CPU and CUDA launchers.
inline void check_spmm_args(const char* op, const at::Tensor& row_ptr, const at::Tensor& col,
                            const at::Tensor& val, int64_t n_cols, const at::Tensor& x) {
  check_csr(op, row_ptr, col, &val);
  check_acc(op, "val", val);
  check_dim(op, "x", x, 2);
  check_floating(op, "x", x);
  PPF_CHECK(op, x.size(1) == n_cols, "x has shape ", x.sizes(), "; expected (n, ", n_cols,
            ") for S with ", n_cols, " columns");
  check_same_device(op, "x", x, "row_ptr", row_ptr);
}

inline void check_sddmm_args(const char* op, const at::Tensor& row_ptr, const at::Tensor& col,
                             const at::Tensor& a, const at::Tensor& b) {
  check_csr(op, row_ptr, col, nullptr);
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, 2);
  check_floating(op, "a", a);
  check_floating(op, "b", b);
  const int64_t R = row_ptr.numel() - 1;
  PPF_CHECK(op, a.size(1) == R, "a has shape ", a.sizes(), "; expected (n, ", R,
            ") for row_ptr of shape ", row_ptr.sizes());
  PPF_CHECK(op, b.size(0) == a.size(0), "b has shape ", b.sizes(), " but a has shape ", a.sizes(),
            "; expected the same number of rows n");
  PPF_CHECK(op, a.scalar_type() == b.scalar_type(), "a has dtype ", a.scalar_type(), " but b has ",
            b.scalar_type(), "; expected the same dtype");
  check_same_device(op, "a", a, "row_ptr", row_ptr);
  check_same_device(op, "b", b, "row_ptr", row_ptr);
}

inline void check_out(const char* op, const at::Tensor& out, int64_t n, int64_t R,
                      const at::Tensor& x) {
  check_dim(op, "out", out, 2);
  check_floating(op, "out", out);
  PPF_CHECK(op, out.size(0) == n && out.size(1) == R, "out has shape ", out.sizes(),
            "; expected (", n, ", ", R, ") for x ", x.sizes(), " and S with ", R, " rows");
  PPF_CHECK(op, out.scalar_type() == x.scalar_type(), "out has dtype ", out.scalar_type(),
            " but x has ", x.scalar_type(), "; expected the same dtype");
  check_same_device(op, "out", out, "x", x);
}

// u = drop(x)·Aᵀ
inline void check_down_args(const char* op, const at::Tensor& x, const at::Tensor& A,
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
inline bool check_bwd_args(const char* op, const at::Tensor& t, const at::Tensor& x,
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

}  // namespace pypeft_fast
