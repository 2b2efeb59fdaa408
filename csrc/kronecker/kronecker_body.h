// Per-thread body of the Kronecker / PHM kernels, shared by kronecker_cpu.cpp and kronecker_cuda.cu.
//
// ΔW = s·Σₕ Aₕ ⊗ Bₕ is applied one token at a time as Yₙ = s·Σₕ Aₕ·Xₙ·Bₕᵀ: every stage of the
// forward and backward (U = A·X, Y += U·Bᵀ, V = G·B, dX += Aᵀ·V, dA += V·Xᵀ, dB += Gᵀ·U) is a
// small dense product C += A·B on one token's (a × b) matrices, and small_gemm_tile is its body:
//   GPU: ROWS = NV = 1, Vec = T        — one thread computes one element of C;
//   CPU: Vec = Lanes<T, W>, ROWS × NV  — a register tile of ROWS rows × NV·W columns, each loaded
//        vector of B shared by ROWS rows, each broadcast element of A by NV vectors.
// A is read element by element through strides (so Aᵀ or Gᵀ cost nothing); B through a loader
// (a row vector on the CPU, one element on the GPU).
#pragma once

#include "../common/macros.h"

namespace pypeft_fast {

// acc[r][v] += Σ_{k < K} a[r·rsa + k·csa] · load_b(k, v)
template <int ROWS, int NV, typename Vec, typename T, typename LoadB>
PPF_HD void small_gemm_tile(const T* a, int64_t rsa, int64_t csa, int64_t K, const LoadB& load_b,
                            Vec (&acc)[ROWS][NV]) {
  for (int64_t k = 0; k < K; ++k) {
    Vec b[NV];
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) b[v] = load_b(k, v);
    PPF_UNROLL
    for (int r = 0; r < ROWS; ++r) {
      const T av = a[r * rsa + k * csa];
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = acc[r][v] + b[v] * av;
    }
  }
}

// The shapes of one sum of Kronecker products: A (h, ao, ai), B (h, bo, bi); a token's input is
// X (ai × bi), its output Y (ao × bo), both row-major slices of x / y.
struct KronShape {
  int64_t h, ao, ai, bo, bi;
  PPF_HD int64_t in() const { return ai * bi; }
  PPF_HD int64_t out() const { return ao * bo; }
  PPF_HD bool empty(int64_t n) const { return n == 0 || in() == 0 || out() == 0; }
};

}  // namespace pypeft_fast
