#include "prologue.h"

namespace sigec_ort {

bool ParseActivation(const std::string& name, Activation* out) {
  static const std::pair<const char*, Activation> kNames[] = {
      {"none", Activation::kNone},
      {"relu", Activation::kRelu},
      {"leaky_relu", Activation::kLeakyRelu},
      {"sigmoid", Activation::kSigmoid},
      {"tanh", Activation::kTanh},
      {"silu", Activation::kSilu},
      {"hard_sigmoid", Activation::kHardSigmoid},
      {"hard_swish", Activation::kHardSwish},
      {"clip", Activation::kClip},
  };
  for (const auto& entry : kNames) {
    if (name == entry.first) {
      *out = entry.second;
      return true;
    }
  }
  return false;
}

bool ParsePadMode(const std::string& name, PadMode* out) {
  if (name == "zeros") {
    *out = PadMode::kZeros;
  } else if (name == "edge") {
    *out = PadMode::kEdge;
  } else if (name == "reflect") {
    *out = PadMode::kReflect;
  } else {
    return false;
  }
  return true;
}

}  // namespace sigec_ort
