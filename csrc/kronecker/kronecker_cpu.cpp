// CPU launchers of the Kronecker / PHM structured apply: ΔW = s·Σₕ Aₕ ⊗ Bₕ is never formed.
//
// Each token's X (ai × bi) goes through the small products of kronecker_body.h while it is in L1
// (the factors, a few KB, stay there too); the products with B on the right run once for a tile
// of tokens stacked (token_tile). Stacked layouts, as in pypeft_fast/families/kronecker.py:
//   Ar[(i,h), j]    = A[h,i,j]          (ao·h × ai)     U = Ar·X  is (ao·h × bi) ≡ (ao × h·bi)
//   Bt[(h,l), k]    = s·B[h,k,l]        (h·bi × bo)     Y += U·Bt
//   Bs[k, (h,l)]    = s·B[h,k,l]        (bo × h·bi)     V = G·Bs  (ao × h·bi) ≡ (ao·h × bi)
//   dX += Arᵀ·V,  dA_rows += V·Xᵀ,  dB_cols += Gᵀ·U (U recomputed; s applied once at the end)
// Every column dimension (bi, bo, ai) is padded with zeros to a multiple of the vector width, so
// a tile is always whole vectors. The hot loops are compiled per ISA (PPF_CPU_CLONES) on float /
// double and instantiated per vector width VB (64 or 32 bytes, common/cpu_width.h: the launchers
// run the CPU's, which also sets the padding and the register tile); other activation dtypes are
// converted a block of tokens at a time around them.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../common/cpu_width.h"
#include "../common/lanes.h"
#include "../ops.h"
#include "kronecker_body.h"
#include "kronecker_checks.h"
#include "kronecker_layout.h"

namespace pypeft_fast {

// Padded per-token geometry of one call.
struct KronPad {
  KronShape s;
  int64_t bip, bop, aip;  // bi, bo, ai rounded up to the vector width
  int64_t hb() const { return s.h * bip; }
  int64_t m() const { return s.ao * s.h; }
};

namespace {

// The vector geometry of T at width VB bytes: W lanes per vector, and the register tile of the
// products, ROWS rows × NV vectors. A tile keeps ROWS·NV accumulators, NV loaded vectors of B and
// a broadcast element of A in registers: 8 × 2 at 64 bytes (19 of AVX-512's 32 zmm); 4 × 2 at 32
// (11 of AVX2's 16 ymm: 8 × 2 needs 19 and spills, 1.5-2x slower; 6 × 2, 15 registers, measured
// 0-13 % slower, 4 × 3 and 8 × 1 slower still: bench/NOTES.md "Kronecker on AVX2").
template <typename T, int VB>
struct KronVec {
  static constexpr int W = VB / static_cast<int>(sizeof(T));  // 16 / 8 float, 8 / 4 double
  static constexpr int ROWS = VB == 64 ? 8 : 4;
  static constexpr int NV = 2;
};

int64_t pad_to(int64_t c, int64_t w) { return (c + w - 1) / w * w; }

// The largest power of two below n (n ≥ 2): the first tail tile after full tiles of n rows.
constexpr int pow2_below(int n) { return n <= 2 ? 1 : 2 * pow2_below((n + 1) / 2); }

template <typename T, int W>
struct LoadRowVec {  // b(k, v) = B[k, j0 + v·W : j0 + (v+1)·W]
  const T* b;
  int64_t ldb;
  PPF_HD Lanes<T, W> operator()(int64_t k, int v) const {
    return Lanes<T, W>::load(b + k * ldb + v * W);
  }
};

// ACC: C += A·B (C loaded into the accumulators); else C = A·B (C only written).
template <bool ACC, int ROWS, int NV, int W, typename T>
PPF_INLINE void gemm_tile(int64_t K, const T* a, int64_t rsa, int64_t csa, const T* b, int64_t ldb,
                          T* c, int64_t ldc) {
  using V = Lanes<T, W>;
  V acc[ROWS][NV];
  if constexpr (ACC) {
    PPF_UNROLL
    for (int r = 0; r < ROWS; ++r)
      PPF_UNROLL
      for (int v = 0; v < NV; ++v) acc[r][v] = V::load(c + r * ldc + v * W);
  }
  small_gemm_tile<ROWS, NV, V>(a, rsa, csa, K, LoadRowVec<T, W>{b, ldb}, acc);
  PPF_UNROLL
  for (int r = 0; r < ROWS; ++r)
    PPF_UNROLL
    for (int v = 0; v < NV; ++v) acc[r][v].store(c + r * ldc + v * W);
}

// Rows [i, M), M - i < 2·R, of a column panel: one tile of R rows if it fits, then R/2, ..., 1.
template <bool ACC, int R, int NV, int W, typename T>
PPF_INLINE void gemm_tail_rows(int64_t i, int64_t M, int64_t K, const T* a, int64_t rsa,
                               int64_t csa, const T* b, int64_t ldb, T* c, int64_t ldc) {
  if (i + R <= M) gemm_tile<ACC, R, NV, W>(K, a + i * rsa, rsa, csa, b, ldb, c + i * ldc, ldc), i += R;
  if constexpr (R > 1) gemm_tail_rows<ACC, R / 2, NV, W>(i, M, K, a, rsa, csa, b, ldb, c, ldc);
}

// Rows [0, M) of one column panel of NV vectors: tiles of ROWS rows, then one each of ROWS/2,
// ..., 1 rows where they fit (ROWS = 8: 8, then 4, 2, 1).
template <bool ACC, int ROWS, int NV, int W, typename T>
PPF_INLINE void gemm_panel(int64_t M, int64_t K, const T* a, int64_t rsa, int64_t csa, const T* b,
                           int64_t ldb, T* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + ROWS <= M; i += ROWS)
    gemm_tile<ACC, ROWS, NV, W>(K, a + i * rsa, rsa, csa, b, ldb, c + i * ldc, ldc);
  if constexpr (ROWS > 1)
    gemm_tail_rows<ACC, pow2_below(ROWS), NV, W>(i, M, K, a, rsa, csa, b, ldb, c, ldc);
}

// C (M × N) (+)= A (M × K; element (i, k) at a[i·rsa + k·csa]) · B (K × N, row stride ldb), at
// width VB. N is a multiple of the vector width: panels of NV vectors (ROWS × NV tiles), then
// panels of 1 vector.
template <bool ACC, int VB, typename T>
PPF_INLINE void gemm(int64_t M, int64_t N, int64_t K, const T* a, int64_t rsa, int64_t csa,
                     const T* b, int64_t ldb, T* c, int64_t ldc) {
  using KV = KronVec<T, VB>;
  constexpr int W = KV::W, ROWS = KV::ROWS, NV = KV::NV;
  int64_t j = 0;
  for (; j + NV * W <= N; j += NV * W)
    gemm_panel<ACC, ROWS, NV, W>(M, K, a, rsa, csa, b + j, ldb, c + j, ldc);
  for (; j < N; j += W) gemm_panel<ACC, ROWS, 1, W>(M, K, a, rsa, csa, b + j, ldb, c + j, ldc);
}
template <int VB, typename T>
PPF_INLINE void gemm_acc(int64_t M, int64_t N, int64_t K, const T* a, int64_t rsa, int64_t csa,
                         const T* b, int64_t ldb, T* c, int64_t ldc) {  // C += A·B
  gemm<true, VB>(M, N, K, a, rsa, csa, b, ldb, c, ldc);
}
template <int VB, typename T>
PPF_INLINE void gemm_set(int64_t M, int64_t N, int64_t K, const T* a, int64_t rsa, int64_t csa,
                         const T* b, int64_t ldb, T* c, int64_t ldc) {  // C = A·B
  gemm<false, VB>(M, N, K, a, rsa, csa, b, ldb, c, ldc);
}

// c[0:n] += p[0:n] (a product computed alone, then added: the sum over tokens is two-level)
template <typename T>
PPF_INLINE void add_to(int64_t n, const T* p, T* c) {
  for (int64_t i = 0; i < n; ++i) c[i] += p[i];
}

// The depth of one dB product (kSumDepth / ao tokens stacked) before it is added.
constexpr int64_t kSumDepth = 32;

// Tokens whose stacked U (T·ao·h × bip) stay within 16K elements (64 KB of float, L2-resident):
// the products that a token makes alone (Ar·X, Arᵀ·V, V·Xᵀ) run per token, the ones with B on
// the right (U·Bt, G·Bs, Gᵀ·U) run once for the T tokens, with T·ao rows (or T·ao deep).
PPF_INLINE int64_t token_tile(const KronPad& g) {
  return std::clamp<int64_t>(16384 / std::max<int64_t>(g.m() * g.bip, 1), 1, 32);
}

// One token's X (ai × bi, row stride bi) as a B operand: x itself when bi is whole vectors,
// else copied into the zero-padded xb (ai × bip).
template <typename T>
PPF_INLINE const T* x_operand(const KronPad& g, const T* xr, T* xb) {
  if (g.bip == g.s.bi) return xr;
  for (int64_t j = 0; j < g.s.ai; ++j) std::memcpy(xb + j * g.bip, xr + j * g.s.bi, g.s.bi * sizeof(T));
  return xb;
}

// xt[l, j] = x[j, l] for x (rows × cols, contiguous) into xt (cols × ldt; ldt ≥ rows a multiple of
// the vector width W), by W × W register transposes (lanes.h); rows past `rows` read as zeros.
template <int W, typename T>
PPF_INLINE void transpose_padded(const T* x, int64_t rows, int64_t cols, T* xt, int64_t ldt) {
  using V = Lanes<T, W>;
  for (int64_t l0 = 0; l0 < cols; l0 += W) {
    const int64_t nl = std::min<int64_t>(W, cols - l0);
    for (int64_t j0 = 0; j0 < rows; j0 += W) {
      V r[W];
      for (int i = 0; i < W; ++i) {
        if (j0 + i >= rows) {
          r[i] = V();
        } else if (nl == W) {
          r[i] = V::load(x + (j0 + i) * cols + l0);
        } else {
          T tmp[W] = {};
          std::memcpy(tmp, x + (j0 + i) * cols + l0, nl * sizeof(T));
          r[i] = V::load(tmp);
        }
      }
      transpose_square<T, W>(r);
      for (int64_t i = 0; i < nl; ++i) r[i].store(xt + (l0 + i) * ldt + j0);
    }
  }
}

// ub (T·ao·h × bip) = Ar·X_t for the T tokens at x (contiguous rows of ai·bi).
template <int VB, typename T>
PPF_INLINE void stacked_U(const KronPad& g, const T* Ar, const T* x, int64_t T_, T* ub, T* xb) {
  const int64_t per = g.m() * g.bip;
  for (int64_t t = 0; t < T_; ++t) {
    const T* X = x_operand(g, x + t * g.s.in(), xb);
    gemm_set<VB>(g.m(), g.bip, g.s.ai, Ar, g.s.ai, 1, X, g.bip, ub + t * per, g.bip);
  }
}

// C (rows × cols, contiguous) += cp (rows × ldp, padded) restricted to the first cols columns.
template <typename T>
PPF_INLINE void add_unpadded(int64_t rows, int64_t cols, const T* cp, int64_t ldp, T* c) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < cols; ++k) c[i * cols + k] += cp[i * ldp + k];
}

// Forward of `rows` tokens: y[t] += s·Σₕ Aₕ·X_t·Bₕᵀ; x, y contiguous acc-dtype rows.
// work: kron_fwd_work() elements, zeroed by the caller (xb's padding stays zero).
template <int VB, typename T>
PPF_INLINE void kron_fwd_rows(const KronPad& g, const T* Ar, const T* Bt, const T* x, int64_t rows,
                              T* y, T* work) {
  const KronShape& s = g.s;
  const int64_t TT = token_tile(g);
  T* xb = work;
  T* ub = xb + s.ai * g.bip;
  T* yb = ub + TT * g.m() * g.bip;
  for (int64_t t0 = 0; t0 < rows; t0 += TT) {
    const int64_t nt = std::min(TT, rows - t0);
    stacked_U<VB>(g, Ar, x + t0 * s.in(), nt, ub, xb);
    T* Y = y + t0 * s.out();  // (nt·ao × bo): the nt tokens' Y stacked
    if (g.bop == s.bo) {
      gemm_acc<VB>(nt * s.ao, g.bop, g.hb(), ub, g.hb(), 1, Bt, g.bop, Y, g.bop);
    } else {
      gemm_set<VB>(nt * s.ao, g.bop, g.hb(), ub, g.hb(), 1, Bt, g.bop, yb, g.bop);
      add_unpadded(nt * s.ao, s.bo, yb, g.bop, Y);
    }
  }
}

// Backward of `rows` tokens (G_t = gy[t] as ao × bo): dx[t] += s·Σₕ Aₕᵀ·G_t·Bₕ (if dx),
// dA_rows += V_t·X_tᵀ as (ao·h × aip) (if dA), dB_cols += Gᵀ·(Ar·X) as (bo × h·bip), unscaled
// (if dB). The sums over tokens are three-level, so that float32 dA/dB stay as accurate as a
// blocked GEMM's: a product of depth ≤ max(bi, kSumDepth) is formed alone, added into the token
// tile's sum, which is added into the thread's.
// gy, x, dx: contiguous acc-dtype rows; work: kron_bwd_work() elements, zeroed by the caller.
template <int VB, typename T>
PPF_INLINE void kron_bwd_rows(const KronPad& g, const T* Ar, const T* Bs, const T* gy, const T* x,
                              int64_t rows, T* dx, T* dA, T* dB, T* work) {
  const KronShape& s = g.s;
  const int64_t TT = token_tile(g), per = g.m() * g.bip;
  T* xb = work;
  T* xt = xb + s.ai * g.bip;
  T* dxb = xt + s.bi * g.aip;
  T* vb = dxb + s.ai * g.bip;
  T* ub = vb + TT * per;
  T* pb = ub + TT * per;                     // one product of dA or dB, before it is added
  T* ta = pb + std::max(g.m() * g.aip, s.bo * g.hb());  // dA of this token tile
  T* tb = ta + g.m() * g.aip;                            // dB of this token tile
  const int64_t kc = std::max<int64_t>(1, kSumDepth / std::max<int64_t>(s.ao, 1));
  for (int64_t t0 = 0; t0 < rows; t0 += TT) {
    const int64_t nt = std::min(TT, rows - t0);
    if (dA != nullptr) std::fill(ta, ta + g.m() * g.aip, T(0));
    if (dB != nullptr) std::fill(tb, tb + s.bo * g.hb(), T(0));
    const T* G = gy + t0 * s.out();  // (nt·ao × bo)
    const T* X0 = x + t0 * s.in();
    if (dx != nullptr || dA != nullptr) {  // V = G·Bs for the nt tokens: (nt·ao × h·bip)
      gemm_set<VB>(nt * s.ao, g.hb(), s.bo, G, s.bo, 1, Bs, g.hb(), vb, g.hb());
    }
    for (int64_t t = 0; t < nt; ++t) {
      const T* V = vb + t * per;  // (ao·h × bip)
      if (dx != nullptr) {        // dX_t += Arᵀ·V_t
        T* dr = dx + (t0 + t) * s.in();
        if (g.bip == s.bi) {
          gemm_acc<VB>(s.ai, g.bip, g.m(), Ar, 1, s.ai, V, g.bip, dr, g.bip);
        } else {
          gemm_set<VB>(s.ai, g.bip, g.m(), Ar, 1, s.ai, V, g.bip, dxb, g.bip);
          add_unpadded(s.ai, s.bi, dxb, g.bip, dr);
        }
      }
      if (dA != nullptr) {  // dA_rows += V_t·X_tᵀ
        const T* xr = X0 + t * s.in();
        transpose_padded<KronVec<T, VB>::W>(xr, s.ai, s.bi, xt, g.aip);
        gemm_set<VB>(g.m(), g.aip, s.bi, V, g.bip, 1, xt, g.aip, pb, g.aip);
        add_to(g.m() * g.aip, pb, ta);
      }
    }
    if (dA != nullptr) add_to(g.m() * g.aip, ta, dA);
    if (dB != nullptr) {  // U = Ar·X for the nt tokens, dB_cols += Gᵀ·U, kc tokens per product
      stacked_U<VB>(g, Ar, X0, nt, ub, xb);
      for (int64_t c0 = 0; c0 < nt; c0 += kc) {
        const int64_t nc = std::min(kc, nt - c0);
        gemm_set<VB>(s.bo, g.hb(), nc * s.ao, G + c0 * s.out(), 1, s.bo, ub + c0 * per, g.hb(), pb,
                    g.hb());
        add_to(s.bo * g.hb(), pb, tb);
      }
      add_to(s.bo * g.hb(), tb, dB);
    }
  }
}

int64_t kron_fwd_work(const KronPad& g) {
  return g.s.ai * g.bip + token_tile(g) * (g.m() * g.bip + g.s.ao * g.bop);
}
int64_t kron_bwd_work(const KronPad& g) {
  return 2 * g.s.ai * g.bip + g.s.bi * g.aip + 2 * token_tile(g) * g.m() * g.bip +
         std::max(g.m() * g.aip, g.s.bo * g.hb()) + g.m() * g.aip + g.s.bo * g.hb();
}

}  // namespace

// The ISA-cloned entry points: one symbol per accumulation dtype and vector width (see
// PPF_CPU_CLONES), and an overload per width that calls it.
#define PPF_KRON_ROWS(T, suffix, VB)                                                               \
  PPF_WIDTH_CLONE(VB, kron_fwd_rows_##suffix##_##VB, fwd_rows_isa,                                 \
                  (const KronPad& g, const T* Ar, const T* Bt, const T* x, int64_t rows, T* y,     \
                   T* work),                                                                       \
                  (g, Ar, Bt, x, rows, y, work), (kron_fwd_rows<VB, T>))                           \
  PPF_WIDTH_CLONE(VB, kron_bwd_rows_##suffix##_##VB, bwd_rows_isa,                                 \
                  (const KronPad& g, const T* Ar, const T* Bs, const T* gy, const T* x,            \
                   int64_t rows, T* dx, T* dA, T* dB, T* work),                                    \
                  (g, Ar, Bs, gy, x, rows, dx, dA, dB, work), (kron_bwd_rows<VB, T>))

PPF_KRON_ROWS(float, f32, 64)
PPF_KRON_ROWS(float, f32, 32)
PPF_KRON_ROWS(double, f64, 64)
PPF_KRON_ROWS(double, f64, 32)
#undef PPF_KRON_ROWS

namespace {

constexpr int64_t kTokenBlock = 32;  // tokens converted / handed to the hot loop at a time

// The geometry at width VB: bi, bo, ai padded to whole vectors of the accumulation dtype.
template <int VB>
KronPad padded(const KronShape& s, at::ScalarType acc) {
  const int64_t w = acc == at::kDouble ? KronVec<double, VB>::W : KronVec<float, VB>::W;
  return KronPad{s, pad_to(s.bi, w), pad_to(s.bo, w), pad_to(s.ai, w)};
}

bool is_acc_block(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc && t.stride(1) == 1 && t.stride(0) == t.size(1);
}

// Rows [r0, r0 + rows) of t as a contiguous acc-dtype block: t itself when it already is one
// (returns its pointer), else converted into `keep`.
template <typename T>
const T* acc_rows(const at::Tensor& t, int64_t r0, int64_t rows, at::ScalarType acc,
                  at::Tensor& keep) {
  if (is_acc_block(t, acc)) return t.data_ptr<T>() + r0 * t.size(1);
  keep = t.narrow(0, r0, rows).to(acc).contiguous();
  return keep.data_ptr<T>();
}

// The destination rows of an accumulation: out itself when it is a contiguous acc-dtype block,
// else a zeroed acc block that add_back() adds to out (rounded once).
template <typename T>
T* acc_out_rows(at::Tensor& out, int64_t r0, int64_t rows, at::ScalarType acc, at::Tensor& tmp) {
  if (is_acc_block(out, acc)) return out.data_ptr<T>() + r0 * out.size(1);
  tmp = at::zeros({rows, out.size(1)}, out.options().dtype(acc));
  return tmp.data_ptr<T>();
}

void add_back(at::Tensor& out, int64_t r0, int64_t rows, const at::Tensor& tmp) {
  if (tmp.defined()) out.narrow(0, r0, rows).add_(tmp);
}

}  // namespace

// y (n, ao·bo) += s·Σₕ (Aₕ ⊗ Bₕ)·x (n, ai·bi), in A's dtype, rounded once to y's.
void kronecker_apply_acc_cpu(at::Tensor& y, const at::Tensor& x, const at::Tensor& A_,
                             const at::Tensor& B_, double scaling) {
  static constexpr const char* op = "kronecker_apply_acc";
  const KronShape s = check_kron_fwd_args(op, y, x, A_, B_);
  const int64_t n = x.size(0);
  if (s.empty(n)) return;
  const at::Tensor A = A_.detach(), B = B_.detach();
  const at::ScalarType acc = A.scalar_type();
  const at::Tensor Ar = stacked_rows(A);
  with_cpu_width([&](auto width) {
    const KronPad g = padded<decltype(width)::value>(s, acc);
    at::Tensor Bt = at::zeros({s.h, g.bip, g.bop}, A.options());
    Bt.narrow(1, 0, s.bi).narrow(2, 0, s.bo).copy_(B.transpose(1, 2).mul(scaling));
    AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
      using T = scalar_t;
      const T* arp = Ar.data_ptr<T>();
      const T* btp = Bt.data_ptr<T>();
      const int64_t work_size = kron_fwd_work(g);
      at::parallel_for(0, (n + kTokenBlock - 1) / kTokenBlock, 1, [&](int64_t b0, int64_t b1) {
        std::vector<T> work(work_size, T(0));
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * kTokenBlock, rows = std::min(kTokenBlock, n - r0);
          at::Tensor xk, yk;
          const T* xp = acc_rows<T>(x, r0, rows, acc, xk);
          T* yp = acc_out_rows<T>(y, r0, rows, acc, yk);
          fwd_rows_isa(width, g, arp, btp, xp, rows, yp, work.data());
          add_back(y, r0, rows, yk);
        }
      });
    });
  });
}

// dx (n, ai·bi) += s·Σₕ (Aₕ ⊗ Bₕ)ᵀ·gy (if dx given); returns (dA, dB) shaped like A and B
// (each (0,) when not asked for).
std::tuple<at::Tensor, at::Tensor> kronecker_apply_bwd_cpu(const at::Tensor& gy, const at::Tensor& x,
                                                    const at::Tensor& A_, const at::Tensor& B_,
                                                    double scaling,
                                                    const std::optional<at::Tensor>& dx_opt,
                                                    bool need_dA, bool need_dB) {
  static constexpr const char* op = "kronecker_apply_bwd";
  bool has_dx;
  const KronShape s = check_kron_bwd_args(op, gy, x, A_, B_, dx_opt, has_dx);
  const int64_t n = x.size(0);
  const at::Tensor A = A_.detach(), B = B_.detach();
  const at::ScalarType acc = A.scalar_type();
  const int nthreads = at::get_num_threads();
  at::Tensor dA = at::empty({0}, A.options()), dB = at::empty({0}, A.options());
  with_cpu_width([&](auto width) {
    const KronPad g = padded<decltype(width)::value>(s, acc);
    at::Tensor dA_part = need_dA ? at::zeros({nthreads, g.m(), g.aip}, A.options()) : at::Tensor();
    at::Tensor dB_part = need_dB ? at::zeros({nthreads, s.bo, g.hb()}, A.options()) : at::Tensor();
    if (!s.empty(n) && (has_dx || need_dA || need_dB)) {
      const at::Tensor Ar = stacked_rows(A);
      at::Tensor Bs = at::zeros({s.bo, s.h, g.bip}, A.options());
      Bs.narrow(2, 0, s.bi).copy_(B.permute({1, 0, 2}).mul(scaling));
      at::Tensor dx = has_dx ? *dx_opt : at::Tensor();
      AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
        using T = scalar_t;
        const T* arp = Ar.data_ptr<T>();
        const T* bsp = Bs.data_ptr<T>();
        const int64_t work_size = kron_bwd_work(g);
        at::parallel_for(0, (n + kTokenBlock - 1) / kTokenBlock, 1, [&](int64_t b0, int64_t b1) {
          const int tid = at::get_thread_num();
          TORCH_INTERNAL_ASSERT(tid < nthreads);
          T* dAp = need_dA ? dA_part[tid].data_ptr<T>() : nullptr;
          T* dBp = need_dB ? dB_part[tid].data_ptr<T>() : nullptr;
          std::vector<T> work(work_size, T(0));
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t r0 = b * kTokenBlock, rows = std::min(kTokenBlock, n - r0);
            at::Tensor gk, xk, dk;
            const T* gp = acc_rows<T>(gy, r0, rows, acc, gk);
            const T* xp = acc_rows<T>(x, r0, rows, acc, xk);
            T* dxp = has_dx ? acc_out_rows<T>(dx, r0, rows, acc, dk) : nullptr;
            bwd_rows_isa(width, g, arp, bsp, gp, xp, rows, dxp, dAp, dBp, work.data());
            if (has_dx) add_back(dx, r0, rows, dk);
          }
        });
      });
    }
    if (need_dA)
      dA = dA_part.sum(0).narrow(1, 0, s.ai).reshape({s.ao, s.h, s.ai}).permute({1, 0, 2}).contiguous();
    if (need_dB)
      dB = dB_part.sum(0).mul_(scaling).reshape({s.bo, s.h, g.bip}).narrow(2, 0, s.bi)
               .permute({1, 0, 2}).contiguous();
  });
  return {dA, dB};
}

}  // namespace pypeft_fast
