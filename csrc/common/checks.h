// Argument checks at the op boundary: every message names the op, the argument and the shapes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

inline void check_seed(const char* op, const at::Tensor& seed) {
  PPF_CHECK(op, seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
            "seed must be a 0-d int64 CPU tensor, got shape ", seed.sizes(), ", dtype ",
            seed.scalar_type(), ", device ", seed.device());
}

inline void check_p(const char* op, double p) {
  PPF_CHECK(op, p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
}

}  // namespace pypeft_fast
