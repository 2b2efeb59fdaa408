// The two products of tokens with a low-rank factor whose rank is the skinny side:
//   skinny_mm_acc    C (n, r) = a (n, k) · b (k, r): each token's row against the r columns of
//                    a factor (LoRA's u = drop(x)·Aᵀ with b = Aᵀ, t = gy·B with b = B);
//   rank_update_acc  out (n, k) (+)= (t (n, r) · A (r, k)) ⊙ m: the rank-r update of wide rows
//                    (LoRA's dx += drop'(t·A)).
//
// One thread's part (the ops parallelise over blocks of rows; the dropout kernels call them per
// block of rows). Rows of a, b and C are unit-stride with the given row strides.
// Each element of the result sums in the same order whatever the row range: the result does not
// depend on the thread count.
#pragma once

#include <cstdint>

namespace pypeft_fast {

void skinny_mm_acc(const float* a, int64_t sa, const float* b, int64_t sb, int64_t n, int64_t k,
                   int64_t r, float* c, int64_t sc, bool accumulate);
void skinny_mm_acc(const double* a, int64_t sa, const double* b, int64_t sb, int64_t n, int64_t k,
                   int64_t r, double* c, int64_t sc, bool accumulate);

// out (n, k) = [out +] (t·A) ⊙ m for a skinny t (n, r) and A (r, k): a rank-r update of wide
// rows (LoRA's dx += drop'(t·A)); m (n, k) per-element multipliers or nullptr for none, out
// added to when accumulate. Same layout rules; each element's sum over r is in order.
void rank_update_acc(const float* t, int64_t st, const float* A, int64_t sA, const float* m,
                     int64_t sm, int64_t n, int64_t r, int64_t k, float* out, int64_t so,
                     bool accumulate);
void rank_update_acc(const double* t, int64_t st, const double* A, int64_t sA, const double* m,
                     int64_t sm, int64_t n, int64_t r, int64_t k, double* out, int64_t so,
                     bool accumulate);

}  // namespace pypeft_fast
