// Per-thread bodies of the sparse kernels, shared by sparse_cpu.cpp and sparse_cuda.cu.
//
// S is an R x C matrix in CSR (ptr (R+1,), col (nnz,), val (nnz,)). `Vec` is what one thread
// holds for one token: `float`/`double` on the GPU (a thread per token) and Lanes<T, N> on the
// CPU (N tokens at once). Loaders are functors so the same body inlines into both.
#pragma once

#include "../common/macros.h"

namespace pypeft_fast {

// y(r) = Σ_{k in row r} val[k] · x(col[k])    — one output of x·Sᵀ for CSR row r.
// Two accumulators hide the add latency (on the CPU) and cost nothing on the GPU.
template <typename Vec, typename Val, typename LoadX>
PPF_HD Vec csr_row_apply(const int64_t* ptr, const int64_t* col, const Val* val, int64_t r,
                         const LoadX& load_x) {
  Vec a0(Val(0)), a1(Val(0));
  int64_t k = ptr[r];
  const int64_t end = ptr[r + 1];
  for (; k + 1 < end; k += 2) {
    a0 = a0 + load_x(col[k]) * val[k];
    a1 = a1 + load_x(col[k + 1]) * val[k + 1];
  }
  if (k < end) a0 = a0 + load_x(col[k]) * val[k];
  return a0 + a1;
}

// SDDMM of CSR row r: for every stored entry k of row r, sink(k, g_r · x(col[k])), where g_r is
// the row-r column of the left operand for this thread's token(s). The sink reduces over tokens
// (a lane sum on the CPU, a warp sum on the GPU) and accumulates out[k].
template <typename Vec, typename LoadX, typename Sink>
PPF_HD void csr_row_sddmm(const int64_t* ptr, const int64_t* col, int64_t r, const Vec& g_r,
                          const LoadX& load_x, Sink& sink) {
  for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) sink(k, g_r * load_x(col[k]));
}

}  // namespace pypeft_fast
