// Host-side layouts shared by the CPU and CUDA launchers of kronecker.
#pragma once

#include <ATen/core/Tensor.h>

namespace pypeft_fast {

// Ar[(i,h), j] = A[h,i,j]: the h Kronecker terms' A stacked as (ao·h × ai) rows.
inline at::Tensor stacked_rows(const at::Tensor& A) {
  return A.permute({1, 0, 2}).reshape({A.size(0) * A.size(1), A.size(2)}).contiguous();
}

}  // namespace pypeft_fast
