// TileGather's prologue: per-channel scale/shift and activation (docs/ops.md), and pad modes.
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>

namespace sigec_ort {

enum class Activation { kNone, kRelu, kLeakyRelu, kSigmoid, kTanh, kSilu, kHardSigmoid, kHardSwish, kClip };

enum class PadMode { kZeros, kEdge, kReflect };

// Parses an activation name; returns false when unknown.
bool ParseActivation(const std::string& name, Activation* out);

// Parses a pad mode name; returns false when unknown.
bool ParsePadMode(const std::string& name, PadMode* out);

// act(v) for a compile-time activation.
template <Activation A>
inline float Activate(float v, float alpha, float beta) {
  if constexpr (A == Activation::kNone) {
    return v;
  } else if constexpr (A == Activation::kRelu) {
    return v < 0.0f ? 0.0f : v;  // NaN stays NaN, as in the reference (torch.relu)
  } else if constexpr (A == Activation::kLeakyRelu) {
    return v >= 0.0f ? v : v * alpha;
  } else if constexpr (A == Activation::kSigmoid) {
    return 1.0f / (1.0f + std::exp(-v));
  } else if constexpr (A == Activation::kTanh) {
    return std::tanh(v);
  } else if constexpr (A == Activation::kSilu) {
    return v * (1.0f / (1.0f + std::exp(-v)));
  } else if constexpr (A == Activation::kHardSigmoid) {
    return std::min(std::max(v * alpha + beta, 0.0f), 1.0f);
  } else if constexpr (A == Activation::kHardSwish) {
    return v * std::min(std::max(v * (1.0f / 6.0f) + 0.5f, 0.0f), 1.0f);
  } else {  // kClip
    return std::min(std::max(v, alpha), beta);
  }
}

// Calls fn(std::integral_constant<Activation, A>{}) for the run-time activation `act`, so that the
// hot loops are compiled once per activation.
template <typename Fn>
inline void DispatchActivation(Activation act, Fn&& fn) {
  switch (act) {
    case Activation::kNone: fn(std::integral_constant<Activation, Activation::kNone>{}); break;
    case Activation::kRelu: fn(std::integral_constant<Activation, Activation::kRelu>{}); break;
    case Activation::kLeakyRelu: fn(std::integral_constant<Activation, Activation::kLeakyRelu>{}); break;
    case Activation::kSigmoid: fn(std::integral_constant<Activation, Activation::kSigmoid>{}); break;
    case Activation::kTanh: fn(std::integral_constant<Activation, Activation::kTanh>{}); break;
    case Activation::kSilu: fn(std::integral_constant<Activation, Activation::kSilu>{}); break;
    case Activation::kHardSigmoid: fn(std::integral_constant<Activation, Activation::kHardSigmoid>{}); break;
    case Activation::kHardSwish: fn(std::integral_constant<Activation, Activation::kHardSwish>{}); break;
    case Activation::kClip: fn(std::integral_constant<Activation, Activation::kClip>{}); break;
  }
}

// Maps a virtual coordinate to [0, size) by the pad mode; -1 means "zero padding".
inline int64_t MapPadded(int64_t pos, int64_t size, PadMode mode) {
  if (pos >= 0 && pos < size) return pos;
  switch (mode) {
    case PadMode::kZeros:
      return -1;
    case PadMode::kEdge:
      return pos < 0 ? 0 : size - 1;
    case PadMode::kReflect: {
      if (size == 1) return 0;
      const int64_t period = 2 * (size - 1);
      int64_t r = pos % period;
      if (r < 0) r += period;
      return r < size ? r : period - r;
    }
  }
  return -1;
}

}  // namespace sigec_ort
