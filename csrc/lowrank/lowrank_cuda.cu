// CUDA launchers of the fused low-rank dropout path. drop(x) is the shared Philox launcher
// (csrc/philox/philox_cuda.cuh); the GEMMs are ATen's (cuBLAS):
//   lowrank_dropout_down  xd = drop(x) (acc dtype), u = xd · Aᵀ
//   lowrank_dropout_bwd   dx += drop(t · A) in place (one pass, fused add), dA = tᵀ · drop(x)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../common/cuda_utils.cuh"
#include "../ops.h"
#include "../philox/philox_cuda.cuh"
#include "lowrank_checks.h"

namespace pypeft_fast {
namespace {

template <typename acc_t, typename x_t>
struct AddInto {  // dx[e] = dx[e] + v (contiguous), summed in acc_t and rounded once
  x_t* dx;
  PPF_HD void operator()(int64_t e, acc_t v) const {
    dx[e] = static_cast<x_t>(static_cast<acc_t>(dx[e]) + v);
  }
};

template <typename acc_t>
struct LoadPlain {
  const acc_t* z;
  PPF_HD acc_t operator()(int64_t e) const { return z[e]; }
};

}  // namespace

at::Tensor lowrank_dropout_down_cuda(const at::Tensor& x, const at::Tensor& A,
                                     const at::Tensor& seed, double p) {
  check_lowrank_down_args("lowrank_dropout_down", x, A, seed, p);
  const c10::cuda::CUDAGuard guard(x.device());
  return at::mm(dropout_to(x, seed, p, A.scalar_type()), A.detach().t());  // no autograd history
}

at::Tensor lowrank_dropout_bwd_cuda(const at::Tensor& t, const at::Tensor& x, const at::Tensor& A,
                                    const at::Tensor& seed, double p,
                                    const std::optional<at::Tensor>& dx_opt, bool need_dA) {
  static constexpr const char* op = "lowrank_dropout_bwd";
  const bool has_dx = check_lowrank_bwd_args(op, t, x, A, seed, p, dx_opt);
  const c10::cuda::CUDAGuard guard(x.device());
  if (has_dx && x.numel() > 0) {
    const at::Tensor z = at::mm(t.detach(), A.detach()).contiguous();  // (n, in), acc dtype
    at::Tensor dx_given = *dx_opt;
    // contiguous, and in a dtype whose accumulation dtype is z's (else a converted copy)
    at::Tensor dx = acc_of(dx_given.scalar_type()) != z.scalar_type() ? dx_given.to(z.scalar_type())
                    : dx_given.is_contiguous()                         ? dx_given
                                                                       : dx_given.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dx.scalar_type(), op, [&] {
      using x_t = scalar_t;
      using acc_t = acc_of_t<x_t>;
      launch_dropout<acc_t>(z.numel(), seed, p, LoadPlain<acc_t>{z.data_ptr<acc_t>()},
                            AddInto<acc_t, x_t>{dx.data_ptr<x_t>()});
    });
    if (!dx.is_same(dx_given)) dx_given.copy_(dx);
  }
  if (!need_dA) return at::empty({0}, A.options());
  return at::mm(t.detach().t(), dropout_to(x, seed, p, A.scalar_type()));
}

}  // namespace pypeft_fast

TORCH_LIBRARY_IMPL(pypeft_fast, CUDA, m) {
  m.impl("lowrank_dropout_down", &pypeft_fast::lowrank_dropout_down_cuda);
  m.impl("lowrank_dropout_bwd", &pypeft_fast::lowrank_dropout_bwd_cuda);
}
