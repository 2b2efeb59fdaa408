// Argument checks of the sparse ops (CSR layout, SpMM, SDDMM), shared by the CPU and CUDA
// launchers (sparse_cpu.cpp, sparse_cuda.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/checks.h"

namespace pypeft_fast {

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

inline void check_spmm_out(const char* op, const at::Tensor& out, int64_t n, int64_t R,
                      const at::Tensor& x) {
  check_dim(op, "out", out, 2);
  check_floating(op, "out", out);
  PPF_CHECK(op, out.size(0) == n && out.size(1) == R, "out has shape ", out.sizes(),
            "; expected (", n, ", ", R, ") for x ", x.sizes(), " and S with ", R, " rows");
  PPF_CHECK(op, out.scalar_type() == x.scalar_type(), "out has dtype ", out.scalar_type(),
            " but x has ", x.scalar_type(), "; expected the same dtype");
  check_same_device(op, "out", out, "x", x);
}

}  // namespace pypeft_fast
