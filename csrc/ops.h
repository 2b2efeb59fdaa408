// Declarations of the CPU implementations registered in ops.cpp (the CUDA ones register in their
// own .cu files). Schemas: pypeft_fast/_ops.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace pypeft_fast {

// sparse (csrc/sparse/)
at::Tensor sparse_spmm_csr_t_cpu(const at::Tensor& row_ptr, const at::Tensor& col,
                                 const at::Tensor& val, int64_t n_cols, const at::Tensor& x);
void sparse_spmm_csr_t_acc_cpu(at::Tensor& out, const at::Tensor& row_ptr, const at::Tensor& col,
                               const at::Tensor& val, const at::Tensor& x);
at::Tensor sparse_sddmm_csr_cpu(const at::Tensor& row_ptr, const at::Tensor& col,
                                const at::Tensor& a, const at::Tensor& b);

// Philox (csrc/philox/)
at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key);
at::Tensor philox_keep_mask_cpu(const at::Tensor& seed, int64_t numel, double p, int64_t start);
at::Tensor philox_dropout_cpu(const at::Tensor& x, const at::Tensor& seed, double p,
                              std::optional<at::ScalarType> dtype);

// the fused low-rank dropout path and DoRA (csrc/lowrank/)
at::Tensor lowrank_dropout_down_cpu(const at::Tensor& x, const at::Tensor& A,
                                    const at::Tensor& seed, double p);
at::Tensor lowrank_dropout_bwd_cpu(const at::Tensor& t, const at::Tensor& x, const at::Tensor& A,
                                   const at::Tensor& seed, double p,
                                   const std::optional<at::Tensor>& dx, bool need_dA);
void dora_scale_epilogue_cpu(at::Tensor& y, const at::Tensor& u, const at::Tensor& B, double scaling,
                             const at::Tensor& c, const std::optional<at::Tensor>& shift);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_grad_prologue_cpu(
    const at::Tensor& gy, const at::Tensor& c, const std::optional<at::Tensor>& y);
at::Tensor skinny_t_mm_cpu(const at::Tensor& a, const at::Tensor& b);
at::Tensor skinny_mm_cpu(const at::Tensor& a, const at::Tensor& b);

// Kronecker / PHM structured apply (csrc/kronecker/)
void kronecker_apply_acc_cpu(at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                             const at::Tensor& B, double scaling);
std::tuple<at::Tensor, at::Tensor> kronecker_apply_bwd_cpu(const at::Tensor& gy, const at::Tensor& x,
                                                    const at::Tensor& A, const at::Tensor& B,
                                                    double scaling,
                                                    const std::optional<at::Tensor>& dx,
                                                    bool need_dA, bool need_dB);

// the Hadamard family's dense form (csrc/hadamard/)
at::Tensor hadamard_weight_cpu(const at::Tensor& W, const at::Tensor& W1a, const at::Tensor& W1b,
                               const at::Tensor& W2a, const at::Tensor& W2b, double scaling);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> hadamard_factor_grads_cpu(
    const at::Tensor& G, const at::Tensor& W1a, const at::Tensor& W1b, const at::Tensor& W2a,
    const at::Tensor& W2b);

// bf16 operands, float32 products and sums (csrc/gemm/)
at::Tensor gemm_bf16_f32_cpu(const at::Tensor& a, const at::Tensor& b, double alpha);
bool gemm_bf16_f32_available();  // whether this torch exports MKL's cblas_gemm_bf16bf16f32

}  // namespace pypeft_fast
