// The CPU implementations of the native ops (TORCH_LIBRARY_IMPL(pypeft_fast, CPU, m)). The CUDA
// ones register in the .cu files (TORCH_LIBRARY_IMPL(pypeft_fast, CUDA, m)).
//
// The schemas are NOT here: pypeft_fast/_ops.py defines every op (schema + fake kernel) in Python,
// once, right after loading this library (the dispatcher accepts a kernel before its schema and
// checks the kernel's C++ signature against the schema when the schema arrives). C++ only
// implements them.
//
// Names do not clash with the torch-path custom ops pypeft_fast::torch_spmm_csr_t and
// pypeft_fast::torch_sddmm_csr (pypeft_fast/families/sparse.py), nor with the Triton ops
// (kernels/: lowrank_fwd/bwd, kronecker_fwd/bwd, sparse_fwd/bwd).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(pypeft_fast, CPU, m) {
  using namespace pypeft_fast;
  m.impl("sparse_spmm_csr_t", &sparse_spmm_csr_t_cpu);
  m.impl("sparse_spmm_csr_t_acc", &sparse_spmm_csr_t_acc_cpu);
  m.impl("sparse_sddmm_csr", &sparse_sddmm_csr_cpu);
  m.impl("philox4x32_10", &philox4x32_10_cpu);
  m.impl("philox_keep_mask", &philox_keep_mask_cpu);
  m.impl("philox_dropout", &philox_dropout_cpu);
  m.impl("lowrank_dropout_down", &lowrank_dropout_down_cpu);
  m.impl("lowrank_dropout_bwd", &lowrank_dropout_bwd_cpu);
  m.impl("dora_scale_epilogue", &dora_scale_epilogue_cpu);
  m.impl("dora_grad_prologue", &dora_grad_prologue_cpu);
  m.impl("skinny_t_mm", &skinny_t_mm_cpu);
  m.impl("skinny_mm", &skinny_mm_cpu);
  m.impl("kronecker_apply_acc", &kronecker_apply_acc_cpu);
  m.impl("kronecker_apply_bwd", &kronecker_apply_bwd_cpu);
  m.impl("gemm_bf16_f32", &gemm_bf16_f32_cpu);
  m.impl("hadamard_weight", &hadamard_weight_cpu);
  m.impl("hadamard_factor_grads", &hadamard_factor_grads_cpu);
}
