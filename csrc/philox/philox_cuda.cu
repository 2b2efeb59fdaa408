// CUDA launcher of philox_dropout and dropout_to (philox_cuda.cuh), which the fused low-rank
// dropout path (csrc/lowrank/lowrank_cuda.cu) calls for drop(x).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/cuda_utils.cuh"
#include "../ops.h"
#include "philox.h"
#include "philox_checks.h"
#include "philox_cuda.cuh"

namespace pypeft_fast {
namespace {

template <typename m_t, typename x_t, typename o_t>
struct LoadAs {  // the value as torch's dropout sees it: x converted to the output dtype
  const x_t* x;
  PPF_HD m_t operator()(int64_t e) const {
    return static_cast<m_t>(static_cast<o_t>(x[e]));
  }
};

template <typename m_t, typename o_t>
struct StoreTo {
  o_t* out;
  PPF_HD void operator()(int64_t e, m_t v) const { out[e] = static_cast<o_t>(v); }
};

}  // namespace

// drop(x) into a fresh contiguous tensor of dtype out_dtype. Instantiated for out = x's dtype
// and out = its accumulation dtype; other pairs convert x first (the same values: the kernel
// rounds x to the output dtype before scaling anyway).
at::Tensor dropout_to(const at::Tensor& x_, const at::Tensor& seed, double p, at::ScalarType out_dtype) {
  at::Tensor x = x_.contiguous();
  if (out_dtype != x.scalar_type() && out_dtype != acc_of(x.scalar_type())) x = x.to(out_dtype);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "philox_dropout", [&] {
    using x_t = scalar_t;
    using m_t = acc_of_t<x_t>;
    if (out_dtype == x.scalar_type()) {
      launch_dropout<m_t>(x.numel(), seed, p, LoadAs<m_t, x_t, x_t>{x.data_ptr<x_t>()},
                          StoreTo<m_t, x_t>{out.data_ptr<x_t>()});
    } else {
      launch_dropout<m_t>(x.numel(), seed, p, LoadAs<m_t, x_t, m_t>{x.data_ptr<x_t>()},
                          StoreTo<m_t, m_t>{out.data_ptr<m_t>()});
    }
  });
  return out;
}

at::Tensor philox_dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p,
                               std::optional<at::ScalarType> dtype) {
  static constexpr const char* op = "philox_dropout";
  check_dropout_args(op, x, seed, p);
  const c10::cuda::CUDAGuard guard(x.device());
  return dropout_to(x, seed, p, dtype.value_or(x.scalar_type()));
}

}  // namespace pypeft_fast

TORCH_LIBRARY_IMPL(pypeft_fast, CUDA, m) {
  m.impl("philox_dropout", &pypeft_fast::philox_dropout_cuda);
}
