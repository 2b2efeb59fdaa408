// CUDA launcher helpers. Only c10/cuda headers: the local toolkit has no cuBLAS/cuSPARSE
// headers, which ATen/cuda/CUDAContext.h would pull in.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <ATen/core/Tensor.h>

#include <type_traits>

#include "macros.h"

namespace pypeft_fast {

constexpr int kWarp = 32;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// The accumulation dtype of a storage dtype: double for double, float otherwise. The CUDA
// launchers instantiate only these pairs (x_t, acc_of_t<x_t>) to keep nvcc time small; a rare
// mixed case (float64 parameters with float32 activations) is converted up front.
template <typename T>
using acc_of_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline at::ScalarType acc_of(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace pypeft_fast
