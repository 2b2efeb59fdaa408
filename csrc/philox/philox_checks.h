// Argument checks of the Philox dropout arguments (seed, p), shared by csrc/philox/ and the fused
// low-rank dropout path (csrc/lowrank/).
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/checks.h"

namespace pypeft_fast {

inline void check_p(const char* op, double p) {
  PPF_CHECK(op, p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
}

inline void check_seed(const char* op, const at::Tensor& seed) {
  PPF_CHECK(op, seed.dim() == 0 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
            "seed must be a 0-d int64 CPU tensor, got shape ", seed.sizes(), ", dtype ",
            seed.scalar_type(), ", device ", seed.device());
}

// philox_dropout's arguments (CPU and CUDA launchers): a floating x, the seed, p.
inline void check_dropout_args(const char* op, const at::Tensor& x, const at::Tensor& seed,
                               double p) {
  check_floating(op, "x", x);
  check_seed(op, seed);
  check_p(op, p);
}

}  // namespace pypeft_fast
