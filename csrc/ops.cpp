// The one list of native ops: schemas (TORCH_LIBRARY) and their CPU implementations.
// CUDA implementations register in the .cu files (TORCH_LIBRARY_IMPL(pypeft_fast, CUDA, m));
// fake (meta) implementations for torch.compile are in pypeft_fast/_ops.py, which also holds
// these schema strings and checks them against the loaded library.
//
// Names do not clash with the torch-path custom ops pypeft_fast::torch_spmm_csr_t and
// pypeft_fast::torch_sddmm_csr (pypeft_fast/families/sparse.py), nor with the Triton ops
// (kernels/: lowrank_fwd/bwd, kronecker_fwd/bwd, sparse_fwd/bwd).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(pypeft_fast, m) {
  // sparse: S (R, C) in CSR; x (n, C); a (n, R), b (n, C)
  m.def("sparse_spmm_csr_t(Tensor row_ptr, Tensor col, Tensor val, int n_cols, Tensor x) -> Tensor");
  m.def("sparse_spmm_csr_t_acc(Tensor(a!) out, Tensor row_ptr, Tensor col, Tensor val, Tensor x) -> ()");
  m.def("sparse_sddmm_csr(Tensor row_ptr, Tensor col, Tensor a, Tensor b) -> Tensor");
  // Philox dropout (pypeft_fast/philox.py) and the fused low-rank dropout path
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
  m.def("philox_keep_mask(Tensor seed, int numel, float p, int start=0) -> Tensor");
  m.def("philox_dropout(Tensor x, Tensor seed, float p, ScalarType? dtype=None) -> Tensor");
  m.def("lowrank_dropout_down(Tensor x, Tensor A, Tensor seed, float p) -> Tensor");
  m.def("lowrank_dropout_bwd(Tensor t, Tensor x, Tensor A, Tensor seed, float p, Tensor(a!)? dx, bool need_dA) -> Tensor");
  // DoRA's per-output-column scale (csrc/lowrank/dora_cpu.cpp)
  m.def("dora_scale_epilogue(Tensor(a!) y, Tensor u, Tensor B, float scaling, Tensor c, Tensor? shift) -> ()");
  m.def("dora_grad_prologue(Tensor gy, Tensor c, Tensor? y) -> (Tensor, Tensor, Tensor)");
  // Kronecker / PHM: A (h, ao, ai), B (h, bo, bi); x (n, ai·bi); y, gy (n, ao·bo)
  m.def("kronecker_apply_acc(Tensor(a!) y, Tensor x, Tensor A, Tensor B, float scaling) -> ()");
  m.def("kronecker_apply_bwd(Tensor gy, Tensor x, Tensor A, Tensor B, float scaling, Tensor(a!)? dx, bool need_dA, bool need_dB) -> (Tensor, Tensor)");
}

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
  m.impl("kronecker_apply_acc", &kronecker_apply_acc_cpu);
  m.impl("kronecker_apply_bwd", &kronecker_apply_bwd_cpu);
}
