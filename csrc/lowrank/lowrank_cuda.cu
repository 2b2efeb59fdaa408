// CUDA launchers of the Philox dropout and the low-rank dropout path. The per-thread body is
// dropout_group (common/philox.h): one thread per Philox call, 8 elements, the same function
// the CPU tests check bit for bit against pypeft_fast/philox.py. The GEMMs are ATen's (cuBLAS):
//   lowrank_dropout_down  xd = drop(x) (acc dtype), u = xd · Aᵀ
//   lowrank_dropout_bwd   dx += drop(t · A) in place (one pass, fused add), dA = tᵀ · drop(x)
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <type_traits>

#include "../common/checks.h"
#include "../common/cuda_utils.cuh"
#include "../common/philox.h"
#include "../ops.h"

namespace pypeft_fast {
namespace {

constexpr int kDropoutThreads = 256;

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

}  // namespace

at::Tensor philox_dropout_cuda(const at::Tensor& x, const at::Tensor& seed, double p,
                               std::optional<at::ScalarType> dtype) {
  static constexpr const char* op = "philox_dropout";
  check_floating(op, "x", x);
  check_seed(op, seed);
  check_p(op, p);
  const c10::cuda::CUDAGuard guard(x.device());
  return dropout_to(x, seed, p, dtype.value_or(x.scalar_type()));
}

at::Tensor lowrank_dropout_down_cuda(const at::Tensor& x, const at::Tensor& A,
                                     const at::Tensor& seed, double p) {
  check_down_args("lowrank_dropout_down", x, A, seed, p);
  const c10::cuda::CUDAGuard guard(x.device());
  return at::mm(dropout_to(x, seed, p, A.scalar_type()), A.detach().t());  // no autograd history
}

at::Tensor lowrank_dropout_bwd_cuda(const at::Tensor& t, const at::Tensor& x, const at::Tensor& A,
                                    const at::Tensor& seed, double p,
                                    const std::optional<at::Tensor>& dx_opt, bool need_dA) {
  static constexpr const char* op = "lowrank_dropout_bwd";
  const bool has_dx = check_bwd_args(op, t, x, A, seed, p, dx_opt);
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
  m.impl("philox_dropout", &pypeft_fast::philox_dropout_cuda);
  m.impl("lowrank_dropout_down", &pypeft_fast::lowrank_dropout_down_cuda);
  m.impl("lowrank_dropout_bwd", &pypeft_fast::lowrank_dropout_bwd_cuda);
}
