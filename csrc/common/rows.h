// Row layout of a 2-D tensor for the CPU row loops, which walk unit-stride rows.
#pragma once

#include <ATen/core/Tensor.h>

namespace pypeft_fast {

// Each row's elements are adjacent (any row stride).
inline bool has_unit_rows(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// t itself when its rows are unit-stride, else a contiguous copy.
inline at::Tensor unit_rows(const at::Tensor& t) { return has_unit_rows(t) ? t : t.contiguous(); }

}  // namespace pypeft_fast
