// CUDA launchers of the sparse family. The per-thread bodies are csr_row_apply and
// csr_row_sddmm (sparse_body.h), the same functions the CPU launchers run with Lanes<T, N>:
//   SpMM   one thread per (token i, CSR row r): out[i, r] += Σ_k val[k]·x[i, col[k]]
//   SDDMM  one warp per CSR row r, lanes over tokens; each entry's product is warp-summed and
//          added by lane 0 (the warp owns row r's entries: deterministic, no atomics).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../common/cuda_utils.cuh"
#include "../ops.h"
#include "sparse_body.h"
#include "sparse_checks.h"

namespace pypeft_fast {
namespace {

template <typename acc_t, typename x_t>
struct LoadStrided {  // x(c) = x[c * stride] of one token's row, converted to acc_t
  const x_t* row;
  int64_t stride;
  bool valid;
  PPF_HD acc_t operator()(int64_t c) const {
    return valid ? static_cast<acc_t>(row[c * stride]) : acc_t(0);
  }
};

template <typename acc_t>
struct WarpSumSink {
  acc_t* out;
  int lane;
  __device__ __forceinline__ void operator()(int64_t k, acc_t prod) {
    const acc_t s = warp_sum(prod);
    if (lane == 0) out[k] += s;
  }
};

constexpr int kSpmmBlockX = 32, kSpmmBlockY = 8;

template <typename acc_t, typename x_t, typename o_t>
__global__ void __launch_bounds__(kSpmmBlockX * kSpmmBlockY)
_sparse_spmm_acc_kernel(const int64_t* __restrict__ ptr, const int64_t* __restrict__ col,
                        const acc_t* __restrict__ val, int64_t R, const x_t* __restrict__ x,
                        int64_t xs0, int64_t xs1, o_t* __restrict__ out, int64_t os0, int64_t os1,
                        int64_t n) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= R) return;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < n;
       i += static_cast<int64_t>(gridDim.y) * blockDim.y) {
    const LoadStrided<acc_t, x_t> load{x + i * xs0, xs1, true};
    const acc_t y = csr_row_apply<acc_t>(ptr, col, val, r, load);
    o_t& o = out[i * os0 + r * os1];
    o = static_cast<o_t>(static_cast<acc_t>(o) + y);
  }
}

constexpr int kSddmmWarpsPerBlock = 8;

template <typename acc_t, typename a_t, typename b_t>
__global__ void __launch_bounds__(kSddmmWarpsPerBlock * kWarp)
_sparse_sddmm_kernel(const int64_t* __restrict__ ptr, const int64_t* __restrict__ col, int64_t R,
                     const a_t* __restrict__ a, int64_t as0, int64_t as1,
                     const b_t* __restrict__ b, int64_t bs0, int64_t bs1, int64_t n,
                     acc_t* __restrict__ out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kSddmmWarpsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (r >= R || ptr[r] == ptr[r + 1]) return;  // whole warp leaves together
  WarpSumSink<acc_t> sink{out, lane};
  for (int64_t t0 = 0; t0 < n; t0 += kWarp) {
    const int64_t t = t0 + lane;
    const bool valid = t < n;
    const acc_t g = valid ? static_cast<acc_t>(a[t * as0 + r * as1]) : acc_t(0);
    const LoadStrided<acc_t, b_t> load{b + (valid ? t : 0) * bs0, bs1, valid};
    csr_row_sddmm<acc_t>(ptr, col, r, g, load, sink);
  }
}

}  // namespace

void sparse_spmm_csr_t_acc_cuda(at::Tensor& out, const at::Tensor& row_ptr_, const at::Tensor& col_,
                                const at::Tensor& val_, const at::Tensor& x) {
  static constexpr const char* op = "sparse_spmm_csr_t_acc";
  check_spmm_args(op, row_ptr_, col_, val_, x.dim() == 2 ? x.size(1) : -1, x);
  const int64_t R = row_ptr_.numel() - 1, n = x.size(0);
  check_spmm_out(op, out, n, R, x);
  if (n == 0 || R == 0 || col_.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  if (val_.scalar_type() != acc_of(x.scalar_type())) {  // rare: float64 values, lower x/out
    at::Tensor out64 = out.to(val_.scalar_type());
    sparse_spmm_csr_t_acc_cuda(out64, row_ptr_, col_, val_, x.to(val_.scalar_type()));
    out.copy_(out64);
    return;
  }
  const at::Tensor row_ptr = row_ptr_.contiguous(), col = col_.contiguous(), val = val_.contiguous();
  const dim3 block(kSpmmBlockX, kSpmmBlockY);
  const dim3 grid(static_cast<unsigned>(ceil_div(R, kSpmmBlockX)),
                  static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kSpmmBlockY), 65535)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "spmm_x", [&] {
    using x_t = scalar_t;  // out has x's dtype (checked), val has acc_t (above)
    using acc_t = acc_of_t<x_t>;
    _sparse_spmm_acc_kernel<acc_t, x_t, x_t><<<grid, block, 0, stream>>>(
        row_ptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), val.data_ptr<acc_t>(), R,
        x.data_ptr<x_t>(), x.stride(0), x.stride(1), out.data_ptr<x_t>(), out.stride(0),
        out.stride(1), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor sparse_spmm_csr_t_cuda(const at::Tensor& row_ptr, const at::Tensor& col,
                                  const at::Tensor& val, int64_t n_cols, const at::Tensor& x) {
  check_spmm_args("sparse_spmm_csr_t", row_ptr, col, val, n_cols, x);
  // The functional form: x converted to val's dtype, accumulated into zeros of that dtype.
  const at::Tensor xa = x.to(val.scalar_type());
  at::Tensor out = at::zeros({x.size(0), row_ptr.numel() - 1}, xa.options());
  sparse_spmm_csr_t_acc_cuda(out, row_ptr, col, val, xa);
  return out;
}

at::Tensor sparse_sddmm_csr_cuda(const at::Tensor& row_ptr_, const at::Tensor& col_,
                                 const at::Tensor& a, const at::Tensor& b) {
  check_sddmm_args("sparse_sddmm_csr", row_ptr_, col_, a, b);
  const int64_t R = row_ptr_.numel() - 1, n = a.size(0), nnz = col_.numel();
  const bool f64 = a.scalar_type() == at::kDouble;
  at::Tensor out = at::zeros({nnz}, a.options().dtype(f64 ? at::kDouble : at::kFloat));
  if (nnz == 0 || n == 0) return out;
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor row_ptr = row_ptr_.contiguous(), col = col_.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(ceil_div(R, kSddmmWarpsPerBlock)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(), "sparse_sddmm_csr", [&] {
    using a_t = scalar_t;  // b has a's dtype (checked)
    using acc_t = acc_of_t<a_t>;
    _sparse_sddmm_kernel<acc_t, a_t, a_t><<<grid, kSddmmWarpsPerBlock * kWarp, 0, stream>>>(
        row_ptr.data_ptr<int64_t>(), col.data_ptr<int64_t>(), R, a.data_ptr<a_t>(), a.stride(0),
        a.stride(1), b.data_ptr<a_t>(), b.stride(0), b.stride(1), n, out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace pypeft_fast

TORCH_LIBRARY_IMPL(pypeft_fast, CUDA, m) {
  m.impl("sparse_spmm_csr_t", &pypeft_fast::sparse_spmm_csr_t_cuda);
  m.impl("sparse_spmm_csr_t_acc", &pypeft_fast::sparse_spmm_csr_t_acc_cuda);
  m.impl("sparse_sddmm_csr", &pypeft_fast::sparse_sddmm_csr_cuda);
}
