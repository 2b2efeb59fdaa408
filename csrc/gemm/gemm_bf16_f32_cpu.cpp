// CPU kernel of gemm_bf16_f32: C (m, n) = alpha · a·b, the products and sums in float32, C float32.
// a and b are bfloat16, or one of them float32:
//  * both bf16: nothing is rounded (a bf16×bf16 product is exact in float32), so C is the float32
//    GEMM of the upcast operands up to the order of its sums;
//  * one float32 (the other bf16): that operand is split exactly into three bf16 parts,
//    v = hi + mid + lo (each the next 8 significant bits, truncated: 24 = 3 × 8), stacked along
//    its free dimension (b's columns, a's rows) for one bf16 GEMM three times as wide; C is the
//    sum of the three products, hi + (mid + lo). Every product is again exact, so C is the
//    float32 GEMM of the operands up to the order of its sums (and to subnormals, which the bf16
//    kernels flush). This is how a bf16 activation meets a float32 factor at the bf16 GEMM's
//    speed: a rank-16 x·Aᵀ at 1024 × 1024 in 0.13 ms against 0.22 for the native mixed-dtype
//    kernel on the 2-core AMX Xeon (bench/NOTES.md "Session 15").
//
// It is MKL's cblas_gemm_bf16bf16f32, which libtorch_cpu exports (MKL is linked into it). On a
// CPU with AMX it runs at bf16 speed: a 1024³ GEMM in 1.3 ms against 7.4 ms for float32 on the
// 2-core Xeon of session 12 (bench/NOTES.md "Session 12"); without AMX (an AVX512-BF16 EPYC) it
// ran at the float32 rate. Which CPUs take it is Python's rule (native.GEMM_BF16_F32_FAST).
// The symbol is a weak reference: a torch without MKL (aarch64 builds) leaves it null, and
// gemm_bf16_f32_available() says so; the op then refuses rather than computing something else.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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

// The float32 (rows, cols) operand f as bf16 parts [hi; mid; lo] stacked along `dim` (0: a
// (3·rows, cols) matrix, 1: (rows, 3·cols)), with hi + mid + lo == v exactly for every finite,
// normal v: hi is v's sign, exponent and first 7 mantissa bits (truncated: never rounds up to
// infinity), mid the same of the remainder v − hi, lo the remainder of that (at most 8
// significant bits are left). A non-finite v is all in hi (inf − inf would make the rest NaN).
// f is read along its unit-stride dimension (a transposed view is split as its transpose and
// returned as a view, which BLAS reads transposed); it is small: a factor or a token × rank matrix.
at::Tensor split3_stacked(const at::Tensor& f, int dim) {
  if (f.stride(1) != 1 && f.stride(0) == 1 && f.size(1) > 1) return split3_stacked(f.t(), 1 - dim).t();
  const at::Tensor fc = f.stride(1) == 1 ? f : f.contiguous();
  const int64_t rows = fc.size(0), cols = fc.size(1), s0 = fc.stride(0);
  at::Tensor out = at::empty(dim == 0 ? std::vector<int64_t>{3 * rows, cols}
                                      : std::vector<int64_t>{rows, 3 * cols},
                             fc.options().dtype(at::kBFloat16));
  const float* fp = fc.const_data_ptr<float>();
  uint16_t* op = reinterpret_cast<uint16_t*>(out.mutable_data_ptr());
  // Part g of element (i, j) goes to row g·rows + i (dim 0) or to column g·cols + j (dim 1).
  const int64_t part_step = dim == 0 ? rows * cols : cols, row_step = dim == 0 ? cols : 3 * cols;
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)),
                   [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* fi = fp + i * s0;
      uint16_t* o0 = op + i * row_step;
      uint16_t* o1 = o0 + part_step;
      uint16_t* o2 = o1 + part_step;
      for (int64_t j = 0; j < cols; ++j) {  // branch-free bit operations: vectorised
        uint32_t bits;
        std::memcpy(&bits, &fi[j], sizeof(bits));
        const bool finite = (bits & 0x7F800000u) != 0x7F800000u;
        float v = fi[j], head;
        uint32_t top = bits & 0xFFFF0000u;
        std::memcpy(&head, &top, sizeof(head));
        o0[j] = static_cast<uint16_t>(top >> 16);
        v = finite ? v - head : 0.0f;
        std::memcpy(&bits, &v, sizeof(bits));
        top = bits & 0xFFFF0000u;
        std::memcpy(&head, &top, sizeof(head));
        o1[j] = static_cast<uint16_t>(top >> 16);
        v -= head;
        std::memcpy(&bits, &v, sizeof(bits));
        o2[j] = static_cast<uint16_t>(bits >> 16);
      }
    }
  });
  return out;
}

}  // namespace

bool gemm_bf16_f32_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

at::Tensor gemm_bf16_f32_cpu(const at::Tensor& a_, const at::Tensor& b_, double alpha) {
  constexpr const char* op = "gemm_bf16_f32";
  check_dim(op, "a", a_, 2);
  check_dim(op, "b", b_, 2);
  const auto bf16_or_f32 = [op](const char* arg, const at::Tensor& t) {
    PPF_CHECK(op, t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat, arg,
              " has dtype ", t.scalar_type(), "; expected BFloat16 (or Float for one operand)");
  };
  bf16_or_f32("a", a_);
  bf16_or_f32("b", b_);
  PPF_CHECK(op, a_.scalar_type() == at::kBFloat16 || b_.scalar_type() == at::kBFloat16,
            "a and b are both Float; expected BFloat16 for at least one (float32 × float32 is "
            "torch's own GEMM)");
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
  // A float32 operand split into its three bf16 parts, stacked along its free dimension: the
  // GEMM is then 3m × n (a split) or m × 3n (b split), its three blocks summed below.
  const bool split_a = a_.scalar_type() == at::kFloat, split_b = b_.scalar_type() == at::kFloat;
  const int64_t gm = split_a ? 3 * m : m, gn = split_b ? 3 * n : n;
  PPF_CHECK(op, gm <= kMax && gn <= kMax, "a ", a_.sizes(), " and b ", b_.sizes(),
            " exceed MKL's 32-bit dimensions once the float32 operand is split in three");
  const at::Tensor a16 = split_a ? split3_stacked(a_, 0) : a_;
  const at::Tensor b16 = split_b ? split3_stacked(b_, 1) : b_;
  int ta = 0, tb = 0;
  int64_t lda = 0, ldb = 0;
  const at::Tensor a = blas_layout(a16, ta, lda) ? a16 : a16.contiguous();
  const at::Tensor b = blas_layout(b16, tb, ldb) ? b16 : b16.contiguous();
  if (!a.is_same(a16)) blas_layout(a, ta, lda);
  if (!b.is_same(b16)) blas_layout(b, tb, ldb);
  PPF_CHECK(op, lda <= kMax && ldb <= kMax, "a's or b's stride exceeds MKL's 32-bit dimensions");
  at::Tensor c = at::empty({gm, gn}, a.options().dtype(at::kFloat));
  cblas_gemm_bf16bf16f32(kRowMajor, ta, tb, static_cast<int>(gm), static_cast<int>(gn),
                         static_cast<int>(k), static_cast<float>(alpha),
                         reinterpret_cast<const uint16_t*>(a.const_data_ptr()), static_cast<int>(lda),
                         reinterpret_cast<const uint16_t*>(b.const_data_ptr()), static_cast<int>(ldb),
                         0.0f, c.mutable_data_ptr<float>(), static_cast<int>(gn));
  if (!split_a && !split_b) return c;
  // hi + (mid + lo): the two small parts first.
  at::Tensor sum = at::empty({m, n}, c.options());
  const float* cp = c.const_data_ptr<float>();
  float* sp = sum.mutable_data_ptr<float>();
  // Block g of row i, column j: row g·m + i (a split) or column g·n + j (b split).
  const int64_t block = split_a ? m * n : n, row = split_a ? n : 3 * n;
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / n), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float* ci = cp + i * row;
      float* si = sp + i * n;
      for (int64_t j = 0; j < n; ++j) si[j] = ci[j] + (ci[block + j] + ci[2 * block + j]);
    }
  });
  return sum;
}

}  // namespace pypeft_fast
