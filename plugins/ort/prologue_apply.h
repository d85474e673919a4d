// In-place application of TileGather's prologue (v * scale + shift, then the activation) to a
// contiguous run of floats. The exp-based activations (sigmoid, tanh, silu) use a 4-wide SSE2
// exponential (SSE2 is part of the x86-64 baseline, so no run-time dispatch is needed), 8 wide
// with AVX2 + FMA when the CPU has them. The piecewise-linear activations (relu, leaky_relu,
// hard_sigmoid, hard_swish, clip) have SSE2 and AVX paths too (the compiler leaves their scalar
// loops unvectorised); these compute exactly the scalar formulas of prologue.h (multiplies and adds
// in the same order, no fused multiply-add, min/max operands ordered so that NaN propagates as in
// std::min/std::max), so every path gives the same bits. Other targets use the scalar formulas.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "prologue.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SIGEC_HAVE_AVX2_PATH 1
#define SIGEC_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define SIGEC_TARGET_AVX __attribute__((target("avx")))
#endif

namespace sigec_ort {

#if defined(__SSE2__)

// e^x for 4 floats, relative error about 2e-7 (Cody-Waite reduction by ln 2 and a degree-6
// polynomial). Inputs are clamped to the finite range of float; NaN stays NaN.
inline __m128 Exp4(__m128 x) {
  const __m128 nan_mask = _mm_cmpunord_ps(x, x);
  const __m128 xc = _mm_min_ps(_mm_max_ps(x, _mm_set1_ps(-87.0f)), _mm_set1_ps(88.0f));
  const __m128i n = _mm_cvtps_epi32(_mm_mul_ps(xc, _mm_set1_ps(1.44269504088896341f)));
  const __m128 nf = _mm_cvtepi32_ps(n);
  // r = x - n * ln2, with ln2 split in a part exact in float and a small correction.
  __m128 r = _mm_sub_ps(xc, _mm_mul_ps(nf, _mm_set1_ps(0.693359375f)));
  r = _mm_sub_ps(r, _mm_mul_ps(nf, _mm_set1_ps(-2.12194440e-4f)));
  // e^r = 1 + r + r^2 * P(r), P fitted on [-ln2/2, ln2/2].
  __m128 p = _mm_set1_ps(1.9875691500e-4f);
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.3981999507e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(8.3334519073e-3f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(4.1665795894e-2f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(1.6666665459e-1f));
  p = _mm_add_ps(_mm_mul_ps(p, r), _mm_set1_ps(5.0000001201e-1f));
  const __m128 r2 = _mm_mul_ps(r, r);
  const __m128 er = _mm_add_ps(_mm_add_ps(_mm_mul_ps(p, r2), r), _mm_set1_ps(1.0f));
  // Multiply by 2^n through the exponent bits (n is in [-126, 127] after the clamp).
  const __m128i scaled = _mm_add_epi32(_mm_castps_si128(er), _mm_slli_epi32(n, 23));
  const __m128 result = _mm_castsi128_ps(scaled);
  return _mm_or_ps(_mm_and_ps(nan_mask, x), _mm_andnot_ps(nan_mask, result));
}

// act(v) for 4 floats, for the exp-based activations.
template <Activation A>
inline __m128 Activate4(__m128 v) {
  const __m128 one = _mm_set1_ps(1.0f);
  if constexpr (A == Activation::kSigmoid) {
    return _mm_div_ps(one, _mm_add_ps(one, Exp4(_mm_sub_ps(_mm_setzero_ps(), v))));
  } else if constexpr (A == Activation::kSilu) {
    return _mm_mul_ps(v, _mm_div_ps(one, _mm_add_ps(one, Exp4(_mm_sub_ps(_mm_setzero_ps(), v)))));
  } else {  // kTanh: sign(v) * (1 - 2 / (e^(2|v|) + 1)), exact at 0 and saturating to +-1
    const __m128 sign = _mm_and_ps(v, _mm_castsi128_ps(_mm_set1_epi32(static_cast<int>(0x80000000u))));
    const __m128 a = _mm_xor_ps(v, sign);  // |v|
    const __m128 e = Exp4(_mm_add_ps(a, a));
    const __m128 t = _mm_sub_ps(one, _mm_div_ps(_mm_set1_ps(2.0f), _mm_add_ps(e, one)));
    return _mm_or_ps(t, sign);
  }
}


// act(v) for 4 floats, for the piecewise-linear activations: bit for bit the scalar Activate<A>.
// _mm_max_ps(a, b) is `a > b ? a : b` and _mm_min_ps(a, b) is `a < b ? a : b`, so with the constant
// first they return v when v is NaN, as std::max(v, c) and std::min(v, c) do (and -0.0 stays).
template <Activation A>
inline __m128 Linear4(__m128 v, __m128 alpha, __m128 beta) {
  const __m128 zero = _mm_setzero_ps(), one = _mm_set1_ps(1.0f);
  if constexpr (A == Activation::kRelu) {
    return _mm_max_ps(zero, v);
  } else if constexpr (A == Activation::kLeakyRelu) {
    const __m128 neg = _mm_cmplt_ps(v, zero);  // !(v >= 0) except for NaN, which keeps v * alpha = NaN
    return _mm_or_ps(_mm_andnot_ps(neg, v), _mm_and_ps(neg, _mm_mul_ps(v, alpha)));
  } else if constexpr (A == Activation::kHardSigmoid) {
    return _mm_min_ps(one, _mm_max_ps(zero, _mm_add_ps(_mm_mul_ps(v, alpha), beta)));
  } else if constexpr (A == Activation::kHardSwish) {
    const __m128 t = _mm_add_ps(_mm_mul_ps(v, _mm_set1_ps(1.0f / 6.0f)), _mm_set1_ps(0.5f));
    return _mm_mul_ps(v, _mm_min_ps(one, _mm_max_ps(zero, t)));
  } else {  // kClip
    return _mm_min_ps(beta, _mm_max_ps(alpha, v));
  }
}

#endif  // __SSE2__

constexpr bool UsesExp(Activation a) {
  return a == Activation::kSigmoid || a == Activation::kTanh || a == Activation::kSilu;
}

constexpr bool IsLinear(Activation a) {
  return a == Activation::kRelu || a == Activation::kLeakyRelu || a == Activation::kHardSigmoid ||
         a == Activation::kHardSwish || a == Activation::kClip;
}

#if defined(SIGEC_HAVE_AVX2_PATH)

// The same exponential as Exp4, 8 floats wide with fused multiply-adds (AVX2 + FMA, chosen at
// run time by HasAvx2Fma, so the library still runs on baseline x86-64).
SIGEC_TARGET_AVX2 static inline __m256 Exp8(__m256 x) {
  const __m256 nan_mask = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
  const __m256i n = _mm256_cvtps_epi32(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)));
  const __m256 nf = _mm256_cvtepi32_ps(n);
  __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 er = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
  const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(er), _mm256_slli_epi32(n, 23));
  return _mm256_blendv_ps(_mm256_castsi256_ps(scaled), x, nan_mask);
}

template <Activation A>
SIGEC_TARGET_AVX2 static inline __m256 Activate8(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if constexpr (A == Activation::kSigmoid) {
    return _mm256_div_ps(one, _mm256_add_ps(one, Exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
  } else if constexpr (A == Activation::kSilu) {
    return _mm256_div_ps(v, _mm256_add_ps(one, Exp8(_mm256_sub_ps(_mm256_setzero_ps(), v))));
  } else {  // kTanh
    const __m256 sign = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u))));
    const __m256 a = _mm256_xor_ps(v, sign);
    const __m256 e = Exp8(_mm256_add_ps(a, a));
    const __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
    return _mm256_or_ps(t, sign);
  }
}

// The exp-based prologue over whole 8-float groups; returns how many floats it processed.
template <Activation A, bool kAffine>
SIGEC_TARGET_AVX2 __attribute__((noinline)) int64_t ApplyPrologueAvx2(float* data, int64_t count, float scale,
                                                                      float shift) {
  const __m256 s = _mm256_set1_ps(scale), t = _mm256_set1_ps(shift);
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    __m256 v = _mm256_loadu_ps(data + k);
    if (kAffine) v = _mm256_fmadd_ps(v, s, t);
    _mm256_storeu_ps(data + k, Activate8<A>(v));
  }
  return k;
}

// SIGEC_ORT_NO_AVX=1 keeps the prologues on their SSE2 paths (read once per process, for tests).
inline bool AvxDisabled() {
  static const bool disabled = [] {
    const char* off = std::getenv("SIGEC_ORT_NO_AVX");
    return off != nullptr && off[0] != '\0' && off[0] != '0';
  }();
  return disabled;
}

inline bool HasAvx2Fma() {
  static const bool supported =
      !AvxDisabled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
}


// Linear4, 8 floats wide. AVX only (no FMA: a fused v * alpha + beta would round differently
// from the scalar formula).

template <Activation A>
SIGEC_TARGET_AVX static inline __m256 Linear8(__m256 v, __m256 alpha, __m256 beta) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  if constexpr (A == Activation::kRelu) {
    return _mm256_max_ps(zero, v);
  } else if constexpr (A == Activation::kLeakyRelu) {
    const __m256 neg = _mm256_cmp_ps(v, zero, _CMP_LT_OQ);
    return _mm256_blendv_ps(v, _mm256_mul_ps(v, alpha), neg);
  } else if constexpr (A == Activation::kHardSigmoid) {
    return _mm256_min_ps(one, _mm256_max_ps(zero, _mm256_add_ps(_mm256_mul_ps(v, alpha), beta)));
  } else if constexpr (A == Activation::kHardSwish) {
    const __m256 t = _mm256_add_ps(_mm256_mul_ps(v, _mm256_set1_ps(1.0f / 6.0f)), _mm256_set1_ps(0.5f));
    return _mm256_mul_ps(v, _mm256_min_ps(one, _mm256_max_ps(zero, t)));
  } else {  // kClip
    return _mm256_min_ps(beta, _mm256_max_ps(alpha, v));
  }
}

// The piecewise-linear prologue over whole 8-float groups; returns how many floats it processed.
template <Activation A, bool kAffine>
SIGEC_TARGET_AVX __attribute__((noinline)) int64_t ApplyLinearAvx(float* data, int64_t count, float scale, float shift,
                                                                   float alpha, float beta) {
  const __m256 s = _mm256_set1_ps(scale), t = _mm256_set1_ps(shift);
  const __m256 a = _mm256_set1_ps(alpha), b = _mm256_set1_ps(beta);
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    __m256 v = _mm256_loadu_ps(data + k);
    if (kAffine) v = _mm256_add_ps(_mm256_mul_ps(v, s), t);
    _mm256_storeu_ps(data + k, Linear8<A>(v, a, b));
  }
  return k;
}

inline bool HasAvx() {
  static const bool supported = !AvxDisabled() && __builtin_cpu_supports("avx");
  return supported;
}

#endif  // SIGEC_HAVE_AVX2_PATH

// data[k] = act(data[k] * scale + shift) for k in [0, count) (the affine part only if kAffine).
template <Activation A, bool kAffine>
inline void ApplyPrologue(float* data, int64_t count, float scale, float shift, float alpha, float beta) {
  int64_t k = 0;
#if defined(__SSE2__)
  if constexpr (UsesExp(A)) {
#if defined(SIGEC_HAVE_AVX2_PATH)
    if (HasAvx2Fma()) {
      k = ApplyPrologueAvx2<A, kAffine>(data, count, scale, shift);
      data += k;
      count -= k;
      k = 0;
    }
#endif
    const __m128 s = _mm_set1_ps(scale), t = _mm_set1_ps(shift);
    for (; k + 4 <= count; k += 4) {
      __m128 v = _mm_loadu_ps(data + k);
      if (kAffine) v = _mm_add_ps(_mm_mul_ps(v, s), t);
      _mm_storeu_ps(data + k, Activate4<A>(v));
    }
    alignas(16) float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int64_t rest = count - k;
    for (int64_t i = 0; i < rest; ++i) tail[i] = data[k + i];
    __m128 v = _mm_load_ps(tail);
    if (kAffine) v = _mm_add_ps(_mm_mul_ps(v, s), t);
    _mm_store_ps(tail, Activate4<A>(v));
    for (int64_t i = 0; i < rest; ++i) data[k + i] = tail[i];
    return;
  }
  if constexpr (IsLinear(A)) {
#if defined(SIGEC_HAVE_AVX2_PATH)
    if (HasAvx()) {
      k = ApplyLinearAvx<A, kAffine>(data, count, scale, shift, alpha, beta);
    }
#endif
    const __m128 s = _mm_set1_ps(scale), t = _mm_set1_ps(shift);
    const __m128 a = _mm_set1_ps(alpha), b = _mm_set1_ps(beta);
    for (; k + 4 <= count; k += 4) {
      __m128 v = _mm_loadu_ps(data + k);
      if (kAffine) v = _mm_add_ps(_mm_mul_ps(v, s), t);
      _mm_storeu_ps(data + k, Linear4<A>(v, a, b));
    }
    // the last 0-3 floats: the scalar loop below
  }
#endif
  for (; k < count; ++k) {
    const float v = kAffine ? data[k] * scale + shift : data[k];
    data[k] = Activate<A>(v, alpha, beta);
  }
}

}  // namespace sigec_ort
