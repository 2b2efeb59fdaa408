// Argument checks shared by the skinny-product ops (skinny_t_mm, skinny_mm): two 2-D operands in
// one accumulation dtype (float32/float64) on one device, each row unit-stride. Each op checks
// its own shape rule after these.
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/checks.h"
#include "../common/rows.h"

namespace pypeft_fast {

inline void check_skinny_operands(const char* op, const at::Tensor& a, const at::Tensor& b) {
  check_dim(op, "a", a, 2);
  check_dim(op, "b", b, 2);
  check_acc(op, "a", a);
  check_dtype(op, "b", b, a.scalar_type());
  check_same_device(op, "b", b, "a", a);
  PPF_CHECK(op, has_unit_rows(a) && has_unit_rows(b), "a (strides ", a.strides(),
            ") and b (strides ", b.strides(), ") must have unit-stride rows");
}

}  // namespace pypeft_fast
