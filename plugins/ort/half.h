// Half-precision cache elements (float16, bfloat16) read as float: the conversions TileGather and
// TileScatter apply to a half `base` (docs/ops.md, "Dtypes").
//
// Every conversion is exact (both half formats are subsets of float32). float16 has a portable
// bit-level conversion and an F16C one (`_mm_cvtph_ps` / `_mm256_cvtph_ps`), chosen at run time by
// HasF16c() so that the library still runs on baseline x86-64; bfloat16 is the upper half of a
// float32 (a shift, which the compiler vectorises).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SIGEC_HAVE_F16C_PATH 1
#define SIGEC_TARGET_F16C __attribute__((target("avx,f16c")))
#endif

namespace sigec_ort {

// float16 bits -> float, for every input (zeros, subnormals, infinities, NaN payloads kept).
inline float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1fu) {  // infinity or NaN
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {  // normal: rebias 15 -> 127
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {  // signed zero
    bits = sign;
  } else {  // subnormal: mantissa * 2^-24, exact in float
    float value = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &value, sizeof(bits));
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// bfloat16 bits -> float (the upper 16 bits of the float32).
inline float BFloat16ToFloat(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline void HalfToFloatRow(float* dst, const uint16_t* src, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = HalfToFloat(src[k]);
}

inline void BFloat16ToFloatRow(float* dst, const uint16_t* src, int64_t count) {
  for (int64_t k = 0; k < count; ++k) dst[k] = BFloat16ToFloat(src[k]);
}

#if defined(SIGEC_HAVE_F16C_PATH)

// True when the CPU has F16C (and AVX); SIGEC_ORT_NO_F16C=1 forces the portable conversion (read
// once per process, for tests).
inline bool HasF16c() {
  static const bool supported = [] {
    const char* off = std::getenv("SIGEC_ORT_NO_F16C");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  }();
  return supported;
}

// float16 -> float with F16C, 8 (then 4) at a time; rows of at least 4 end with an overlapping
// group of 4, shorter ones go through a zero-padded group.
SIGEC_TARGET_F16C inline void HalfToFloatRowF16c(float* dst, const uint16_t* src, int64_t count) {
  int64_t k = 0;
  for (; k + 8 <= count; k += 8) {
    _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + k))));
  }
  if (k == count) return;
  if (count >= 4) {
    for (; k + 4 <= count; k += 4) {
      _mm_storeu_ps(dst + k, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k))));
    }
    if (k < count) {
      const int64_t last = count - 4;
      _mm_storeu_ps(dst + last, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + last))));
    }
    return;
  }
  alignas(16) uint16_t tail[4] = {0, 0, 0, 0};
  std::memcpy(tail, src + k, sizeof(uint16_t) * static_cast<size_t>(count - k));
  alignas(16) float out[4];
  _mm_store_ps(out, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tail))));
  std::memcpy(dst + k, out, sizeof(float) * static_cast<size_t>(count - k));
}

// `channels` rows of `count` float16 values (strides in elements) to float rows; one call per run
// of a gather's window row, so that the call is paid once for a block of channels.
SIGEC_TARGET_F16C __attribute__((noinline)) inline void HalfRowsF16c(float* dst, int64_t dst_stride,
                                                                      const uint16_t* src, int64_t src_stride,
                                                                      int64_t channels, int64_t count) {
  if (count < 4) {
    for (int64_t c = 0; c < channels; ++c) HalfToFloatRow(dst + c * dst_stride, src + c * src_stride, count);
    return;
  }
  const int64_t last = count - 4;
  for (int64_t c = 0; c < channels; ++c) {
    const uint16_t* s = src + c * src_stride;
    float* d = dst + c * dst_stride;
    for (int64_t k = 0; k < last; k += 4) {
      _mm_storeu_ps(d + k, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + k))));
    }
    _mm_storeu_ps(d + last, _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + last))));
  }
}

// A whole contiguous stretch (TileScatter's copy of a band of `base`).
SIGEC_TARGET_F16C __attribute__((noinline)) inline void HalfToFloatSpanF16c(float* dst, const uint16_t* src,
                                                                            int64_t count) {
  HalfToFloatRowF16c(dst, src, count);
}

#else

inline bool HasF16c() { return false; }

#endif  // SIGEC_HAVE_F16C_PATH

// How TileGather/TileScatter read a `base` of one element type: `One` converts an element, `Rows`
// a block of `channels` rows of `count` elements, `Span` a contiguous stretch.
struct FloatBase {
  using T = float;
  static constexpr bool kHalf = false;
  static float One(float v) { return v; }
};

struct HalfBase {  // float16, portable conversion
  using T = uint16_t;
  static constexpr bool kHalf = true;
  static float One(uint16_t v) { return HalfToFloat(v); }
  static void Rows(float* dst, int64_t dst_stride, const uint16_t* src, int64_t src_stride, int64_t channels,
                   int64_t count) {
    for (int64_t c = 0; c < channels; ++c) HalfToFloatRow(dst + c * dst_stride, src + c * src_stride, count);
  }
  static void Span(float* dst, const uint16_t* src, int64_t count) { HalfToFloatRow(dst, src, count); }
};

#if defined(SIGEC_HAVE_F16C_PATH)
struct HalfBaseF16c {  // float16 with F16C (only when HasF16c())
  using T = uint16_t;
  static constexpr bool kHalf = true;
  static float One(uint16_t v) { return HalfToFloat(v); }
  static void Rows(float* dst, int64_t dst_stride, const uint16_t* src, int64_t src_stride, int64_t channels,
                   int64_t count) {
    HalfRowsF16c(dst, dst_stride, src, src_stride, channels, count);
  }
  static void Span(float* dst, const uint16_t* src, int64_t count) { HalfToFloatSpanF16c(dst, src, count); }
};
#endif

struct BFloat16Base {
  using T = uint16_t;
  static constexpr bool kHalf = true;
  static float One(uint16_t v) { return BFloat16ToFloat(v); }
  static void Rows(float* dst, int64_t dst_stride, const uint16_t* src, int64_t src_stride, int64_t channels,
                   int64_t count) {
    for (int64_t c = 0; c < channels; ++c) BFloat16ToFloatRow(dst + c * dst_stride, src + c * src_stride, count);
  }
  static void Span(float* dst, const uint16_t* src, int64_t count) { BFloat16ToFloatRow(dst, src, count); }
};

// Calls fn(Base{}) with the reader of a base of element type `type` (float, float16 or bfloat16);
// returns false for any other type.
template <typename Fn>
inline bool DispatchBase(ONNXTensorElementDataType type, Fn&& fn) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      fn(FloatBase{});
      return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
#if defined(SIGEC_HAVE_F16C_PATH)
      if (HasF16c()) {
        fn(HalfBaseF16c{});
        return true;
      }
#endif
      fn(HalfBase{});
      return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16:
      fn(BFloat16Base{});
      return true;
    default:
      return false;
  }
}

// True for the element types a `base` may have.
inline bool IsBaseType(ONNXTensorElementDataType type) {
  return type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT || type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ||
         type == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16;
}

}  // namespace sigec_ort
