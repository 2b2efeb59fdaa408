// CPU kernel of gemm_bf16_f32: C (m, n) = alpha · a·b for bfloat16 a (m, k) and b (k, n), the
// products and sums in float32, C float32. Nothing is rounded: a bf16×bf16 product is exact in
// float32, so C is the float32 GEMM of the upcast operands up to the order of its sums.
//
// It is MKL's cblas_gemm_bf16bf16f32, which libtorch_cpu exports (MKL is linked into it). On a
// CPU with AMX it runs at bf16 speed: a 1024³ GEMM in 1.3 ms against 7.4 ms for float32 on the
// 2-core Xeon of session 12 (bench/NOTES.md "Session 12"); without AMX (an AVX512-BF16 EPYC) it
// ran at the float32 rate. Which CPUs take it is Python's rule (native.GEMM_BF16_F32_FAST).
// The symbol is a weak reference: a torch without MKL (aarch64 builds) leaves it null, and
// gemm_bf16_f32_available() says so; the op then refuses rather than computing something else.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "../common/checks.h"
#include "../ops.h"

extern "C" {
// MKL's CBLAS prototype with its enums as int (CBLAS_LAYOUT, CBLAS_TRANSPOSE) and MKL_INT as int:
// torch links MKL's LP64 interface.
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
}

namespace pypeft_fast {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// How BLAS reads a (rows, cols) operand of a row-major product: as it is (kNoTrans, ld = its row
// stride) or transposed (kTrans, ld = its column stride). False: neither; it is copied first.
bool blas_layout(const at::Tensor& t, int& trans, int64_t& ld) {
  const int64_t rows = t.size(0), cols = t.size(1);
  if (t.stride(1) == 1 && (rows <= 1 || t.stride(0) >= cols)) {
    trans = kNoTrans;
    ld = std::max<int64_t>(rows <= 1 ? cols : t.stride(0), 1);
    return true;
  }
  if (t.stride(0) == 1 && (cols <= 1 || t.stride(1) >= rows)) {
    trans = kTrans;
    ld = std::max<int64_t>(cols <= 1 ? rows : t.stride(1), 1);
    return true;
  }
  return false;
}

}  // namespace

bool gemm_bf16_f32_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

at::Tensor gemm_bf16_f32_cpu(const at::Tensor& a_, const at::Tensor& b_, double alpha) {
  constexpr const char* op = "gemm_bf16_f32";
  check_dim(op, "a", a_, 2);
  check_dim(op, "b", b_, 2);
  check_dtype(op, "a", a_, at::kBFloat16);
  check_dtype(op, "b", b_, at::kBFloat16);
  check_same_device(op, "b", b_, "a", a_);
  PPF_CHECK(op, a_.size(1) == b_.size(0), "a ", a_.sizes(), " and b ", b_.sizes(),
            " do not chain (a's columns must equal b's rows)");
  PPF_CHECK(op, gemm_bf16_f32_available(), "this torch has no MKL cblas_gemm_bf16bf16f32 (a ",
            "build without MKL); use the float32 GEMM of the upcast operands");
  const int64_t m = a_.size(0), k = a_.size(1), n = b_.size(1);
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  PPF_CHECK(op, m <= kMax && n <= kMax && k <= kMax, "a ", a_.sizes(), " and b ", b_.sizes(),
            " exceed MKL's 32-bit dimensions");
  if (m == 0 || n == 0 || k == 0) return at::zeros({m, n}, a_.options().dtype(at::kFloat));
  int ta = 0, tb = 0;
  int64_t lda = 0, ldb = 0;
  const at::Tensor a = blas_layout(a_, ta, lda) ? a_ : a_.contiguous();
  const at::Tensor b = blas_layout(b_, tb, ldb) ? b_ : b_.contiguous();
  if (!a.is_same(a_)) blas_layout(a, ta, lda);
  if (!b.is_same(b_)) blas_layout(b, tb, ldb);
  PPF_CHECK(op, lda <= kMax && ldb <= kMax, "a's or b's stride exceeds MKL's 32-bit dimensions");
  at::Tensor c = at::empty({m, n}, a.options().dtype(at::kFloat));
  cblas_gemm_bf16bf16f32(kRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n),
                         static_cast<int>(k), static_cast<float>(alpha),
                         reinterpret_cast<const uint16_t*>(a.const_data_ptr()), static_cast<int>(lda),
                         reinterpret_cast<const uint16_t*>(b.const_data_ptr()), static_cast<int>(ldb),
                         0.0f, c.mutable_data_ptr<float>(), static_cast<int>(n));
  return c;
}

}  // namespace pypeft_fast
