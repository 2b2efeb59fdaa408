// The CUDA Philox dropout launcher, shared by the Philox ops (philox_cuda.cu) and the fused
// low-rank dropout path (csrc/lowrank/lowrank_cuda.cu). The per-thread body is dropout_group
// (philox.h): one thread per Philox call, 8 elements, the same function the CPU tests check bit
// for bit against pypeft_fast/philox.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>

#include "../common/cuda_utils.cuh"
#include "philox.h"

namespace pypeft_fast {
namespace {

constexpr int kDropoutThreads = 256;

template <typename m_t, typename Load, typename Store>
__global__ void __launch_bounds__(kDropoutThreads)
_dropout_kernel(int64_t numel, PhiloxKey key, uint32_t threshold, m_t scale, Load load, Store store) {
  const int64_t groups = (numel + kElementsPerCall - 1) / kElementsPerCall;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dropout_group<m_t>(static_cast<uint64_t>(g), 0, numel, key, threshold, scale, load, store);
}

template <typename m_t, typename Load, typename Store>
void launch_dropout(int64_t numel, const at::Tensor& seed, double p, Load load, Store store) {
  if (numel == 0) return;
  const int64_t groups = ceil_div(numel, kElementsPerCall);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(groups, kDropoutThreads), 1 << 16));
  _dropout_kernel<m_t><<<blocks, kDropoutThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      numel, philox_key(static_cast<uint64_t>(seed.item<int64_t>())), keep_threshold(p),
      static_cast<m_t>(1.0 / (1.0 - p)), load, store);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// drop(x) into a fresh contiguous tensor of dtype out_dtype (philox_cuda.cu).
at::Tensor dropout_to(const at::Tensor& x, const at::Tensor& seed, double p, at::ScalarType out_dtype);

}  // namespace pypeft_fast
