// CPU launchers of the Philox ops (philox4x32_10, philox_keep_mask, philox_dropout) and the
// CPU mask generator they share with the fused low-rank dropout path (philox_cpu.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <type_traits>

#include "../common/checks.h"
#include "../common/cpu_width.h"
#include "../ops.h"
#include "philox.h"
#include "philox_checks.h"
#include "philox_cpu.h"

namespace pypeft_fast {
namespace {

// Philox words of the kPhiloxLanes calls g, g+1, ...: w[word][lane]. Portable: philox4x32_10 per lane,
// which GCC vectorises across lanes (but with 64x64 vpmullq for the 32x32->64 products).
PPF_INLINE void philox_lanes(uint64_t g, PhiloxKey key, uint32_t w[4][kPhiloxLanes]) {
  for (int l = 0; l < kPhiloxLanes; ++l) {
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
                                                             uint32_t w[4][kPhiloxLanes]) {
  alignas(64) uint32_t lo[kPhiloxLanes], hi[kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
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

// The same rounds on 8-counter AVX2 vectors (vpmuludq on ymm), H vectors interleaved so that
// one vector's multiplies overlap the others' latency: for CPUs without AVX-512. c[word][h] holds
// the words of calls g + 8·h + lane. The high words come from vpmuludq on the even and the odd
// lanes, the low words from vpmulld. Measured on the AVX2 EPYC, rounds alone, one thread:
// 0.425 ms per 1 M elements at H = 2 with shifts for the low words (latency-bound), 0.257 at
// H = 4 with vpmulld (which gained nothing at H = 2).
template <int H>
__attribute__((target("avx2"), always_inline)) inline void philox_avx2(uint64_t g, PhiloxKey key,
                                                                        __m256i c[4][H]) {
  alignas(32) uint32_t lo[8 * H], hi[8 * H];
  for (int l = 0; l < 8 * H; ++l) {
    const uint64_t gl = g + static_cast<uint64_t>(l);
    lo[l] = static_cast<uint32_t>(gl);
    hi[l] = static_cast<uint32_t>(gl >> 32);
  }
  for (int h = 0; h < H; ++h) {
    c[0][h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo + 8 * h));
    c[1][h] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi + 8 * h));
    c[2][h] = _mm256_setzero_si256();
    c[3][h] = _mm256_setzero_si256();
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const __m256i kk0 = _mm256_set1_epi32(static_cast<int>(k0)), kk1 = _mm256_set1_epi32(static_cast<int>(k1));
    PPF_UNROLL
    for (int h = 0; h < H; ++h) {
      // 64-bit products of the even lanes (in place) and the odd lanes (shuffled down): their
      // high halves; the low halves are vpmulld's
      const __m256i p0e = _mm256_mul_epu32(c[0][h], m0), p0o = _mm256_mul_epu32(_mm256_shuffle_epi32(c[0][h], 0xF5), m0);
      const __m256i p1e = _mm256_mul_epu32(c[2][h], m1), p1o = _mm256_mul_epu32(_mm256_shuffle_epi32(c[2][h], 0xF5), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_shuffle_epi32(p0e, 0xF5), p0o, 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_shuffle_epi32(p1e, 0xF5), p1o, 0xAA);
      const __m256i lo0 = _mm256_mullo_epi32(c[0][h], m0), lo1 = _mm256_mullo_epi32(c[2][h], m1);
      c[0][h] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[1][h]), kk0);
      c[2][h] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[3][h]), kk1);
      c[1][h] = lo1;
      c[3][h] = lo0;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

__attribute__((target("avx2"))) void philox_lanes_avx2(uint64_t g, PhiloxKey key,
                                                       uint32_t w[4][kPhiloxLanes]) {
  static_assert(kPhiloxLanes == 16, "two 8-lane vectors");
  __m256i c[4][2];
  philox_avx2<2>(g, key, c);
  for (int j = 0; j < 4; ++j)
    for (int h = 0; h < 2; ++h)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[j] + 8 * h), c[j][h]);
}

// The float multipliers of 8·H calls straight from the registers: out[8·l + j] for call l, its
// 8 elements the 16-bit halves of its words 0..3 in order. A 4 × 8 transpose of the words (unpack)
// puts each call's 128 bits in one 128-bit lane; those widen to 8 × 32-bit and compare with the
// threshold (below 2¹⁶, so the signed compare is exact). The scalar loop of dropout_mult did the
// same per element.
template <int H>
__attribute__((target("avx2"))) void philox_mult_avx2_f32(uint64_t g, PhiloxKey key,
                                                          uint32_t threshold, float scale,
                                                          float* out) {
  __m256i c[4][H];
  philox_avx2<H>(g, key, c);
  const __m256i below = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
  const __m256 sc = _mm256_set1_ps(scale);
  for (int h = 0; h < H; ++h) {
    const __m256i t0 = _mm256_unpacklo_epi32(c[0][h], c[1][h]);  // calls 0 1 | 4 5: words 0, 1
    const __m256i t1 = _mm256_unpackhi_epi32(c[0][h], c[1][h]);  // calls 2 3 | 6 7
    const __m256i t2 = _mm256_unpacklo_epi32(c[2][h], c[3][h]);  // words 2, 3
    const __m256i t3 = _mm256_unpackhi_epi32(c[2][h], c[3][h]);
    const __m256i calls[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                              _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
    for (int q = 0; q < 4; ++q) {  // calls q (low 128 bits) and q + 4 (high), of this vector
      for (int part = 0; part < 2; ++part) {
        const __m128i words = part ? _mm256_extracti128_si256(calls[q], 1) : _mm256_castsi256_si128(calls[q]);
        const __m256i u16 = _mm256_cvtepu16_epi32(words);
        const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(u16, below));
        _mm256_storeu_ps(out + 8 * (8 * h + q + 4 * part), _mm256_and_ps(keep, sc));
      }
    }
  }
}
#endif

// out[8*i + j] = keep(8*(g0+i) + j) ? scale : 0 for i < ngroups.
template <typename T>
PPF_INLINE void dropout_mult(uint64_t g0, int64_t ngroups, PhiloxKey key, uint32_t threshold, T scale,
                             T* out) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  const int isa_bytes = cpu_isa_vector_bytes();
#endif
  for (int64_t done = 0; done < ngroups;) {
    uint32_t w[4][kPhiloxLanes];
    const uint64_t g = g0 + static_cast<uint64_t>(done);
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    if constexpr (std::is_same_v<T, float>) {
      if (isa_bytes == 32) {  // 32 calls while they fit; the last 16 may pass ngroups (philox_cpu.h)
        if (ngroups - done >= 2 * kPhiloxLanes) {
          philox_mult_avx2_f32<4>(g, key, threshold, scale, out + done * kElementsPerCall);
          done += 2 * kPhiloxLanes;
        } else {
          philox_mult_avx2_f32<2>(g, key, threshold, scale, out + done * kElementsPerCall);
          done += kPhiloxLanes;
        }
        continue;
      }
    }
    if (isa_bytes == 64)
      philox_lanes_avx512(g, key, w);
    else if (isa_bytes == 32)
      philox_lanes_avx2(g, key, w);
    else
#endif
      philox_lanes(g, key, w);
    const int64_t m = std::min<int64_t>(kPhiloxLanes, ngroups - done);
    for (int64_t l = 0; l < m; ++l)
      for (int j = 0; j < kElementsPerCall; ++j) {
        const uint32_t u16 = (w[j >> 1][l] >> (16 * (j & 1))) & 0xffffu;
        out[(done + l) * kElementsPerCall + j] = u16 >= threshold ? scale : T(0);
      }
    done += kPhiloxLanes;
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
  check_dropout_args(op, x_, seed, p);
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
}  // namespace pypeft_fast
