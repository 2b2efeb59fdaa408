// CUDA launchers of the Kronecker / PHM structured apply. The per-thread body is
// small_gemm_tile (kronecker_body.h) with one element per thread, the function the CPU launchers
// run with Lanes register tiles; the stacked layouts are kronecker_cpu.cpp's (unpadded here):
//   _kron_tok_fwd  one block per token: U = Ar·X into shared memory, then y += U·Bt
//   _kron_tok_bwd  one block per token: V = G·Bs (shared), dx += Arᵀ·V; V and U = Ar·X written
//                  out for the reductions when dA / dB are asked for
//   _kron_reduce   out[r, c] += Σ_t Σ_k P_t[r, k]·Q_t[c, k] over a chunk of tokens per block
//                  row (dA_rows = Σ V·Xᵀ, dB_cols = Σ Gᵀ·U), one atomicAdd per chunk; under
//                  torch.use_deterministic_algorithms(True) a single block row: each element's
//                  chunks are added by one thread in token order (bit-reproducible)
// Activations are converted to the accumulation dtype up front (float32/float64).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/cuda_utils.cuh"
#include "../ops.h"
#include "kronecker_body.h"
#include "kronecker_checks.h"
#include "kronecker_layout.h"

namespace pypeft_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxSharedBytes = 48 * 1024;  // without an opt-in
constexpr int64_t kReduceTokenChunk = 64;

template <typename T>
struct Strided {  // b(k, ·) = p[k·ld]: one column of a row-major matrix
  const T* p;
  int64_t ld;
  PPF_HD T operator()(int64_t k, int) const { return p[k * ld]; }
};

// dot(a[0], a[csa], ...; b) over K: one element of C, the CPU tile's body with one row, one lane
template <typename T>
__device__ __forceinline__ T dot(const T* a, int64_t csa, int64_t K, const T* b, int64_t ldb) {
  T acc[1][1] = {{T(0)}};
  small_gemm_tile<1, 1, T>(a, 0, csa, K, Strided<T>{b, ldb}, acc);
  return acc[0][0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
_kron_tok_fwd(KronShape s, const T* __restrict__ x, const T* __restrict__ Ar,
              const T* __restrict__ Bt, T* __restrict__ y, int64_t n) {
  extern __shared__ unsigned char smem[];
  T* U = reinterpret_cast<T*>(smem);  // (ao·h × bi) ≡ (ao × h·bi)
  const int64_t m = s.ao * s.h, hb = s.h * s.bi;
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const T* X = x + t * s.in();
    for (int64_t e = threadIdx.x; e < m * s.bi; e += blockDim.x)
      U[e] = dot(Ar + (e / s.bi) * s.ai, 1, s.ai, X + e % s.bi, s.bi);
    __syncthreads();
    for (int64_t e = threadIdx.x; e < s.out(); e += blockDim.x)
      y[t * s.out() + e] += dot(U + (e / s.bo) * hb, 1, hb, Bt + e % s.bo, s.bo);
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
_kron_tok_bwd(KronShape s, const T* __restrict__ g, const T* __restrict__ x,
              const T* __restrict__ Ar, const T* __restrict__ Bs, T* __restrict__ dx,
              T* __restrict__ Vg, T* __restrict__ Ug, int64_t n) {
  extern __shared__ unsigned char smem[];
  T* V = reinterpret_cast<T*>(smem);  // (ao × h·bi) ≡ (ao·h × bi)
  const int64_t m = s.ao * s.h, hb = s.h * s.bi, per = m * s.bi;
  const bool need_v = dx != nullptr || Vg != nullptr;
  for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
    const T* G = g + t * s.out();
    if (need_v) {
      for (int64_t e = threadIdx.x; e < per; e += blockDim.x) {
        const T v = dot(G + (e / hb) * s.bo, 1, s.bo, Bs + e % hb, hb);
        V[e] = v;
        if (Vg != nullptr) Vg[t * per + e] = v;
      }
    }
    __syncthreads();
    if (dx != nullptr)
      for (int64_t e = threadIdx.x; e < s.in(); e += blockDim.x)
        dx[t * s.in() + e] += dot(Ar + e / s.bi, s.ai, m, V + e % s.bi, s.bi);
    if (Ug != nullptr) {
      const T* X = x + t * s.in();
      for (int64_t e = threadIdx.x; e < per; e += blockDim.x)
        Ug[t * per + e] = dot(Ar + (e / s.bi) * s.ai, 1, s.ai, X + e % s.bi, s.bi);
    }
    __syncthreads();
  }
}

// out (rows × cols) += Σ_t Σ_{k<K} P[t·pt + r·pr + k·pk] · Q[t·qt + c·qr + k·qk]
template <typename T>
__global__ void __launch_bounds__(kThreads)
_kron_reduce(const T* __restrict__ P, int64_t pt, int64_t pr, int64_t pk, const T* __restrict__ Q,
             int64_t qt, int64_t qr, int64_t qk, int64_t K, int64_t rows, int64_t cols, int64_t n,
             T* __restrict__ out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= rows * cols) return;
  const int64_t r = e / cols, c = e % cols;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.y) * kReduceTokenChunk; t0 < n;
       t0 += static_cast<int64_t>(gridDim.y) * kReduceTokenChunk) {
    const int64_t t1 = t0 + kReduceTokenChunk < n ? t0 + kReduceTokenChunk : n;
    T acc = T(0);
    for (int64_t t = t0; t < t1; ++t) acc += dot(P + t * pt + r * pr, pk, K, Q + t * qt + c * qr, qk);
    atomicAdd(out + e, acc);
  }
}

bool is_acc_block(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc && t.is_contiguous();
}

int grid_for(int64_t n) { return static_cast<int>(std::min<int64_t>(n, 8192)); }

size_t shared_bytes(const char* op, const KronShape& s, const at::Tensor& A) {
  const size_t bytes = static_cast<size_t>(s.ao * s.h * s.bi) * A.element_size();
  PPF_CHECK(op, bytes <= kMaxSharedBytes, "A ", A.sizes(), " with bi = ", s.bi, " needs ", bytes,
            " bytes of shared memory per token (ao·h·bi values); the CUDA kernel holds at most ",
            kMaxSharedBytes, ": use backend='triton' or 'torch' for these factors");
  return bytes;
}

template <typename T>
void reduce(const at::Tensor& P, int64_t pt, int64_t pr, int64_t pk, const at::Tensor& Q, int64_t qt,
            int64_t qr, int64_t qk, int64_t K, at::Tensor& out, int64_t n, cudaStream_t stream) {
  const int64_t rows = out.size(0), cols = out.size(1);
  // Parallel token chunks add in a run-dependent order; deterministic mode: one chunk row.
  const int64_t chunk_rows = at::globalContext().deterministicAlgorithms()
                                 ? 1 : std::min<int64_t>(ceil_div(n, kReduceTokenChunk), 65535);
  const dim3 grid(static_cast<unsigned>(ceil_div(rows * cols, kThreads)),
                  static_cast<unsigned>(chunk_rows));
  _kron_reduce<T><<<grid, kThreads, 0, stream>>>(P.data_ptr<T>(), pt, pr, pk, Q.data_ptr<T>(), qt,
                                                 qr, qk, K, rows, cols, n, out.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void kronecker_apply_acc_cuda(at::Tensor& y, const at::Tensor& x_, const at::Tensor& A_,
                             const at::Tensor& B_, double scaling) {
  static constexpr const char* op = "kronecker_apply_acc";
  const KronShape s = check_kron_fwd_args(op, y, x_, A_, B_);
  const int64_t n = x_.size(0);
  if (s.empty(n)) return;
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor A = A_.detach(), B = B_.detach();
  const at::ScalarType acc = A.scalar_type();
  const size_t smem = shared_bytes(op, s, A);
  const at::Tensor x = x_.to(acc).contiguous();
  const at::Tensor Ar = stacked_rows(A);
  const at::Tensor Bt = B.permute({0, 2, 1}).reshape({s.h * s.bi, s.bo}).mul(scaling).contiguous();
  at::Tensor ya = is_acc_block(y, acc) ? y : at::zeros({n, s.out()}, x.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    _kron_tok_fwd<scalar_t><<<grid_for(n), kThreads, smem, stream>>>(
        s, x.data_ptr<scalar_t>(), Ar.data_ptr<scalar_t>(), Bt.data_ptr<scalar_t>(),
        ya.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (!ya.is_same(y)) y.add_(ya);
}

std::tuple<at::Tensor, at::Tensor> kronecker_apply_bwd_cuda(const at::Tensor& gy_,
                                                           const at::Tensor& x_,
                                                           const at::Tensor& A_,
                                                           const at::Tensor& B_, double scaling,
                                                           const std::optional<at::Tensor>& dx_opt,
                                                           bool need_dA, bool need_dB) {
  static constexpr const char* op = "kronecker_apply_bwd";
  bool has_dx;
  const KronShape s = check_kron_bwd_args(op, gy_, x_, A_, B_, dx_opt, has_dx);
  const int64_t n = x_.size(0), m = s.ao * s.h, hb = s.h * s.bi, per = m * s.bi;
  const at::Tensor A = A_.detach(), B = B_.detach();
  const at::ScalarType acc = A.scalar_type();
  at::Tensor dA_rows = at::zeros({m, s.ai}, A.options());
  at::Tensor dB_cols = at::zeros({s.bo, hb}, A.options());
  if (!s.empty(n) && (has_dx || need_dA || need_dB)) {
    const c10::cuda::CUDAGuard guard(x_.device());
    const size_t smem = shared_bytes(op, s, A);
    const at::Tensor x = x_.to(acc).contiguous(), g = gy_.to(acc).contiguous();
    const at::Tensor Ar = stacked_rows(A);
    const at::Tensor Bs = B.permute({1, 0, 2}).reshape({s.bo, hb}).mul(scaling).contiguous();
    at::Tensor dx = has_dx ? *dx_opt : at::Tensor();
    at::Tensor dxa = !has_dx || is_acc_block(dx, acc) ? dx : at::zeros({n, s.in()}, x.options());
    at::Tensor V = need_dA ? at::empty({n, per}, x.options()) : at::Tensor();
    at::Tensor U = need_dB ? at::empty({n, per}, x.options()) : at::Tensor();
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
      using T = scalar_t;
      _kron_tok_bwd<T><<<grid_for(n), kThreads, smem, stream>>>(
          s, g.data_ptr<T>(), x.data_ptr<T>(), Ar.data_ptr<T>(), Bs.data_ptr<T>(),
          has_dx ? dxa.data_ptr<T>() : nullptr, need_dA ? V.data_ptr<T>() : nullptr,
          need_dB ? U.data_ptr<T>() : nullptr, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      // dA_rows[(i,h), j] = Σ_t Σ_l V_t[(i,h), l]·X_t[j, l]
      if (need_dA) reduce<T>(V, per, s.bi, 1, x, s.in(), s.bi, 1, s.bi, dA_rows, n, stream);
      // dB_cols[k, q] = Σ_t Σ_i G_t[i, k]·U_t[i, q]   (U_t as ao × h·bi)
      if (need_dB) reduce<T>(g, s.out(), 1, s.bo, U, per, 1, hb, s.ao, dB_cols, n, stream);
    });
    if (has_dx && !dxa.is_same(dx)) dx.add_(dxa);
  }
  at::Tensor dA = need_dA ? dA_rows.reshape({s.ao, s.h, s.ai}).permute({1, 0, 2}).contiguous()
                          : at::empty({0}, A.options());
  at::Tensor dB = need_dB ? dB_cols.mul_(scaling).reshape({s.bo, s.h, s.bi}).permute({1, 0, 2})
                                .contiguous()
                          : at::empty({0}, A.options());
  return {dA, dB};
}

}  // namespace pypeft_fast

TORCH_LIBRARY_IMPL(pypeft_fast, CUDA, m) {
  m.impl("kronecker_apply_acc", &pypeft_fast::kronecker_apply_acc_cuda);
  m.impl("kronecker_apply_bwd", &pypeft_fast::kronecker_apply_bwd_cuda);
}
