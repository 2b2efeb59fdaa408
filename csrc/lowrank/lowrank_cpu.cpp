// CPU launchers of the Philox dropout ops and of the fused low-rank dropout path.
//
// The mask is generated a block of rows at a time into a thread-local multiplier buffer
// (scale or 0 per element, cache-sized) and consumed while the block is hot:
//   lowrank_dropout_down:  u[rows]  = (x[rows] ⊙ m / (1-p)) · Aᵀ            (x read once)
//   lowrank_dropout_bwd:   dx[rows] += (t[rows] · A) ⊙ m / (1-p)              (in place)
//                          dA      += t[rows]ᵀ · (x[rows] ⊙ m / (1-p))        (one mask for both)
// The GEMMs are ATen's (MKL); the Philox loop is compiled per ISA (PPF_CPU_CLONES).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <memory>
#include <vector>

#include "../common/checks.h"
#include "../common/philox.h"
#include "../ops.h"

namespace pypeft_fast {
namespace {

constexpr int kLanes = 16;  // Philox calls computed side by side (one AVX-512 vector of counters)

// Philox words of the kLanes calls g, g+1, ...: w[word][lane]. Portable: philox4x32_10 per lane,
// which GCC vectorises across lanes (but with 64x64 vpmullq for the 32x32->64 products).
PPF_INLINE void philox_lanes(uint64_t g, PhiloxKey key, uint32_t w[4][kLanes]) {
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t gl = g + static_cast<uint64_t>(l);
    uint32_t c[4] = {static_cast<uint32_t>(gl), static_cast<uint32_t>(gl >> 32), 0u, 0u};
    philox4x32_10(c, key);
    w[0][l] = c[0];
    w[1][l] = c[1];
    w[2][l] = c[2];
    w[3][l] = c[3];
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// The same rounds on 16 counters in AVX-512 registers with vpmuludq (32x32->64 on even lanes),
// which GCC does not derive from portable code. Bit-exactness: tests/test_native_ops.py.
__attribute__((target("avx512f"))) void philox_lanes_avx512(uint64_t g, PhiloxKey key,
                                                             uint32_t w[4][kLanes]) {
  alignas(64) uint32_t lo[kLanes], hi[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    const uint64_t gl = g + static_cast<uint64_t>(l);
    lo[l] = static_cast<uint32_t>(gl);
    hi[l] = static_cast<uint32_t>(gl >> 32);
  }
  __m512i c0 = _mm512_load_si512(lo), c1 = _mm512_load_si512(hi);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  const __mmask16 odd = 0xAAAA;
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    // products of even lanes (in place) and odd lanes (shifted down), 64-bit each
    const __m512i p0e = _mm512_mul_epu32(c0, m0), p0o = _mm512_mul_epu32(_mm512_srli_epi64(c0, 32), m0);
    const __m512i p1e = _mm512_mul_epu32(c2, m1), p1o = _mm512_mul_epu32(_mm512_srli_epi64(c2, 32), m1);
    const __m512i lo0 = _mm512_mask_blend_epi32(odd, p0e, _mm512_slli_epi64(p0o, 32));
    const __m512i hi0 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p0e, 32), p0o);
    const __m512i lo1 = _mm512_mask_blend_epi32(odd, p1e, _mm512_slli_epi64(p1o, 32));
    const __m512i hi1 = _mm512_mask_blend_epi32(odd, _mm512_srli_epi64(p1e, 32), p1o);
    const __m512i n0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    const __m512i n2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  _mm512_storeu_si512(w[0], c0);
  _mm512_storeu_si512(w[1], c1);
  _mm512_storeu_si512(w[2], c2);
  _mm512_storeu_si512(w[3], c3);
}
bool has_avx512() {
  static const bool yes = (__builtin_cpu_init(), __builtin_cpu_supports("avx512f"));
  return yes;
}
#endif

// out[8*i + j] = keep(8*(g0+i) + j) ? scale : 0 for i < ngroups.
template <typename T>
PPF_INLINE void dropout_mult(uint64_t g0, int64_t ngroups, PhiloxKey key, uint32_t threshold, T scale,
                             T* out) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  const bool avx512 = has_avx512();
#endif
  for (int64_t done = 0; done < ngroups; done += kLanes) {
    uint32_t w[4][kLanes];
    const uint64_t g = g0 + static_cast<uint64_t>(done);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if (avx512)
      philox_lanes_avx512(g, key, w);
    else
#endif
      philox_lanes(g, key, w);
    const int64_t m = std::min<int64_t>(kLanes, ngroups - done);
    for (int64_t l = 0; l < m; ++l)
      for (int j = 0; j < kElementsPerCall; ++j) {
        const uint32_t u16 = (w[j >> 1][l] >> (16 * (j & 1))) & 0xffffu;
        out[(done + l) * kElementsPerCall + j] = u16 >= threshold ? scale : T(0);
      }
  }
}

}  // namespace

PPF_CPU_CLONES void dropout_mult_f32(uint64_t g0, int64_t ngroups, PhiloxKey key, uint32_t thr,
                                     float scale, float* out) {
  dropout_mult<float>(g0, ngroups, key, thr, scale, out);
}
PPF_CPU_CLONES void dropout_mult_f64(uint64_t g0, int64_t ngroups, PhiloxKey key, uint32_t thr,
                                     double scale, double* out) {
  dropout_mult<double>(g0, ngroups, key, thr, scale, out);
}

namespace {

inline void dropout_mult_isa(uint64_t g0, int64_t ng, PhiloxKey k, uint32_t t, float s, float* o) {
  dropout_mult_f32(g0, ng, k, t, s, o);
}
inline void dropout_mult_isa(uint64_t g0, int64_t ng, PhiloxKey k, uint32_t t, double s, double* o) {
  dropout_mult_f64(g0, ng, k, t, s, o);
}

// Uninitialised, growable scratch memory (a std::vector would zero-fill it on every resize).
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  size_t size = 0;
  T* get(size_t n) {
    if (n > size) {
      p.reset(new T[n]);
      size = n;
    }
    return p.get();
  }
};

// Multipliers of the flat elements [e0, e0 + count): returns a pointer m with m[i] the
// multiplier of element e0 + i (generated from e0's Philox group on).
template <typename T>
const T* mult_range(int64_t e0, int64_t count, PhiloxKey key, uint32_t thr, T scale,
                    Scratch<T>& buf) {
  const int64_t g0 = e0 / kElementsPerCall;
  const int64_t g1 = (e0 + count + kElementsPerCall - 1) / kElementsPerCall;
  T* m = buf.get(static_cast<size_t>((g1 - g0 + kLanes) * kElementsPerCall));
  dropout_mult_isa(static_cast<uint64_t>(g0), g1 - g0, key, thr, scale, m);
  return m + (e0 - g0 * kElementsPerCall);
}

// The dropout scale 1/(1-p) as torch applies it to a tensor of dtype T (float32 rounds it).
template <typename T>
T dropout_scale(double p) { return static_cast<T>(1.0 / (1.0 - p)); }

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

// Rows per block: kBlockElements elements per operand block, at least 8 rows. Fewer, larger blocks
// amortise the per-block GEMM call, whose packing of A is repeated per call (measured: 16-row
// blocks cost 2x the mask itself).
#ifndef PPF_LOWRANK_BLOCK_ELEMENTS
#define PPF_LOWRANK_BLOCK_ELEMENTS 65536
#endif
constexpr int64_t kBlockElements = PPF_LOWRANK_BLOCK_ELEMENTS;
int64_t rows_per_block(int64_t k) { return std::max<int64_t>(8, kBlockElements / std::max<int64_t>(k, 1)); }

at::Tensor blob(void* p, int64_t rows, int64_t cols, const at::TensorOptions& o) {
  return at::from_blob(p, {rows, cols}, o);
}

// d[i, j] = x[r0 + i, j] · m[i, j] for a block of rows: drop(x) for the rows in cache.
template <typename acc_t, typename x_t>
void dropped_rows(const x_t* xp, int64_t s0, int64_t s1, int64_t r0, int64_t rows, int64_t k,
                  const acc_t* m, acc_t* d) {
  for (int64_t i = 0; i < rows; ++i) {
    const x_t* xr = xp + (r0 + i) * s0;
    for (int64_t j = 0; j < k; ++j) d[i * k + j] = static_cast<acc_t>(xr[j * s1]) * m[i * k + j];
  }
}

}  // namespace

// Raw Philox4x32-10 outputs for counters (m, 4) and key (2,), uint32 values held in int64.
at::Tensor philox4x32_10_cpu(const at::Tensor& counter, const at::Tensor& key) {
  static constexpr const char* op = "philox4x32_10";
  check_dim(op, "counter", counter, 2);
  PPF_CHECK(op, counter.size(1) == 4 && counter.scalar_type() == at::kLong, "counter has shape ",
            counter.sizes(), " and dtype ", counter.scalar_type(), "; expected (m, 4) int64");
  PPF_CHECK(op, key.dim() == 1 && key.numel() == 2 && key.scalar_type() == at::kLong,
            "key has shape ", key.sizes(), " and dtype ", key.scalar_type(), "; expected (2,) int64");
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  const PhiloxKey pk{static_cast<uint32_t>(kp[0]), static_cast<uint32_t>(kp[1])};
  for (int64_t i = 0; i < c.size(0); ++i) {
    uint32_t w[4];
    for (int j = 0; j < 4; ++j) w[j] = static_cast<uint32_t>(cp[4 * i + j]);
    philox4x32_10(w, pk);
    for (int j = 0; j < 4; ++j) o[4 * i + j] = static_cast<int64_t>(w[j]);
  }
  return out;
}

// keep[i] = keep(start + i) for i < numel (bool).
at::Tensor philox_keep_mask_cpu(const at::Tensor& seed, int64_t numel, double p, int64_t start) {
  static constexpr const char* op = "philox_keep_mask";
  check_seed(op, seed);
  check_p(op, p);
  PPF_CHECK(op, numel >= 0 && start >= 0, "numel and start must be >= 0, got numel ", numel,
            ", start ", start);
  at::Tensor out = at::empty({numel}, seed.options().dtype(at::kBool));
  const PhiloxKey key = philox_key(seed_value(seed));
  const uint32_t thr = keep_threshold(p);
  bool* o = out.data_ptr<bool>();
  at::parallel_for(0, numel, 1 << 16, [&](int64_t i0, int64_t i1) {
    Scratch<float> buf;
    const float* m = mult_range<float>(start + i0, i1 - i0, key, thr, 1.0f, buf);
    for (int64_t i = i0; i < i1; ++i) o[i] = m[i - i0] != 0.0f;
  });
  return out;
}

// drop(x) = x ⊙ keep / (1-p) over x's flat (row-major) index, in dtype (default x's).
at::Tensor philox_dropout_cpu(const at::Tensor& x_, const at::Tensor& seed, double p,
                              std::optional<at::ScalarType> dtype) {
  static constexpr const char* op = "philox_dropout";
  check_floating(op, "x", x_);
  check_seed(op, seed);
  check_p(op, p);
  const at::Tensor x = x_.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(dtype.value_or(x.scalar_type())));
  check_floating(op, "dtype", out);
  const int64_t numel = x.numel();
  const PhiloxKey key = philox_key(seed_value(seed));
  const uint32_t thr = keep_threshold(p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using x_t = scalar_t;
    const x_t* xp = x.data_ptr<x_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), op, [&] {
      using o_t = scalar_t;
      // opmath of the output dtype: float for float/bf16/half, double for double
      using m_t = std::conditional_t<std::is_same_v<o_t, double>, double, float>;
      o_t* o = out.data_ptr<o_t>();
      const m_t scale = dropout_scale<m_t>(p);
      at::parallel_for(0, numel, 1 << 15, [&](int64_t i0, int64_t i1) {
        Scratch<m_t> buf;
        const m_t* m = mult_range<m_t>(i0, i1 - i0, key, thr, scale, buf);
        for (int64_t i = i0; i < i1; ++i)
          o[i] = static_cast<o_t>(static_cast<m_t>(static_cast<o_t>(xp[i])) * m[i - i0]);
      });
    });
  });
  return out;
}

// u = drop(x) · Aᵀ; x: (n, in) any float dtype, A: (r, in) float32/float64 → u: (n, r) A's dtype.
at::Tensor lowrank_dropout_down_cpu(const at::Tensor& x, const at::Tensor& A,
                                    const at::Tensor& seed, double p) {
  static constexpr const char* op = "lowrank_dropout_down";
  check_down_args(op, x, A, seed, p);
  const int64_t n = x.size(0), k = x.size(1), r = A.size(0);
  at::Tensor u = at::empty({n, r}, A.options());
  if (n == 0) return u;
  if (k == 0) return u.zero_();
  const PhiloxKey key = philox_key(seed_value(seed));
  const uint32_t thr = keep_threshold(p);
  // Detached: the worker threads of at::parallel_for do not inherit the caller's grad mode, and
  // the GEMMs below must never record autograd history (the op has no autograd formula).
  const at::Tensor At = A.detach().t();
  const int64_t RB = rows_per_block(k), blocks = (n + RB - 1) / RB;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), op, [&] {
    using acc_t = scalar_t;
    const acc_t scale = dropout_scale<acc_t>(p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
      using x_t = scalar_t;
      const x_t* xp = x.data_ptr<x_t>();
      const int64_t s0 = x.stride(0), s1 = x.stride(1);
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        Scratch<acc_t> mbuf;
        std::vector<acc_t> xd(RB * k);
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t r0 = b * RB, rows = std::min<int64_t>(RB, n - r0);
          const acc_t* m = mult_range<acc_t>(r0 * k, rows * k, key, thr, scale, mbuf);
          dropped_rows(xp, s0, s1, r0, rows, k, m, xd.data());
          at::Tensor ub = u.narrow(0, r0, rows);
          at::mm_out(ub, blob(xd.data(), rows, k, A.options()), At);
        }
      });
    });
  });
  return u;
}

// dx += drop(t · A) in place (when dx is given) and returns dA = tᵀ · drop(x) (when need_dA,
// else an empty (0,) tensor). t: (n, r), A: (r, in) in the accumulation dtype; x, dx: (n, in).
at::Tensor lowrank_dropout_bwd_cpu(const at::Tensor& t_, const at::Tensor& x, const at::Tensor& A_,
                                   const at::Tensor& seed, double p,
                                   const std::optional<at::Tensor>& dx_opt, bool need_dA) {
  static constexpr const char* op = "lowrank_dropout_bwd";
  const bool has_dx = check_bwd_args(op, t_, x, A_, seed, p, dx_opt);
  // Detached (see lowrank_dropout_down_cpu): no autograd inside the worker threads.
  const at::Tensor t = t_.detach(), A = A_.detach();
  const int64_t n = x.size(0), k = x.size(1), r = A.size(0);
  const int nthreads = at::get_num_threads();
  at::Tensor partial = need_dA ? at::zeros({nthreads, r, k}, A.options()) : at::Tensor();
  if (n > 0 && k > 0 && (has_dx || need_dA)) {
    const PhiloxKey key = philox_key(seed_value(seed));
    const uint32_t thr = keep_threshold(p);
    const int64_t RB = rows_per_block(k), blocks = (n + RB - 1) / RB;
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), op, [&] {
      using acc_t = scalar_t;
      const acc_t scale = dropout_scale<acc_t>(p);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
        using x_t = scalar_t;
        const x_t* xp = x.data_ptr<x_t>();
        const int64_t s0 = x.stride(0), s1 = x.stride(1);
        x_t* dxp = has_dx ? dx_opt->data_ptr<x_t>() : nullptr;
        const int64_t d0 = has_dx ? dx_opt->stride(0) : 0, d1 = has_dx ? dx_opt->stride(1) : 0;
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
          Scratch<acc_t> mbuf;
          std::vector<acc_t> buf(RB * k);
          const int tid = at::get_thread_num();
          TORCH_INTERNAL_ASSERT(tid < nthreads);
          for (int64_t b = b0; b < b1; ++b) {
            const int64_t r0 = b * RB, rows = std::min<int64_t>(RB, n - r0);
            const acc_t* m = mult_range<acc_t>(r0 * k, rows * k, key, thr, scale, mbuf);
            at::Tensor bb = blob(buf.data(), rows, k, A.options());
            if (has_dx) {  // buf = t[rows] · A, then dx[rows] += buf ⊙ m (rounded once)
              at::mm_out(bb, t.narrow(0, r0, rows), A);
              for (int64_t i = 0; i < rows; ++i) {
                x_t* dr = dxp + (r0 + i) * d0;
                const acc_t* zr = buf.data() + i * k;
                const acc_t* mr = m + i * k;
                for (int64_t j = 0; j < k; ++j)
                  dr[j * d1] = static_cast<x_t>(static_cast<acc_t>(dr[j * d1]) + zr[j] * mr[j]);
              }
            }
            if (need_dA) {  // buf = x[rows] ⊙ m; partial[tid] += t[rows]ᵀ · buf
              dropped_rows(xp, s0, s1, r0, rows, k, m, buf.data());
              at::Tensor pt = partial.select(0, tid);
              pt.addmm_(t.narrow(0, r0, rows).t(), bb);
            }
          }
        });
      });
    });
  }
  if (!need_dA) return at::empty({0}, A.options());
  return partial.sum(0);
}

}  // namespace pypeft_fast
