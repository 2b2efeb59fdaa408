// Generic argument checks at the op boundary (dims, dtypes, devices): every message names the op,
// the argument and the shapes. Family checks build on these in csrc/<family>/<family>_checks.h;
// nothing here includes a family header.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

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

}  // namespace pypeft_fast
