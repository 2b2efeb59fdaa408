// C = aᵀ·b for a skinny a: a (n, r) with r small (a rank), b (n, k), C (r, k). The sum over the n
// tokens of rank-r outer products: LoRA's dA = tᵀ·x and dB = (uᵀ·gy)ᵀ, DoRA's gyᵀ·u.
//
// One thread's part (the op skinny_t_mm parallelises over column chunks of b; lowrank_dropout_bwd
// calls it per block of rows). Rows of a, b and C are unit-stride with the given row strides.
// The sum over tokens runs in row order for every element of C: the result does not depend on
// the thread count.
#pragma once

#include <cstdint>

namespace pypeft_fast {

void skinny_t_mm_acc(const float* a, int64_t sa, const float* b, int64_t sb, int64_t n, int64_t r,
                     int64_t k, float* c, int64_t sc, bool accumulate);
void skinny_t_mm_acc(const double* a, int64_t sa, const double* b, int64_t sb, int64_t n,
                     int64_t r, int64_t k, double* c, int64_t sc, bool accumulate);

}  // namespace pypeft_fast
