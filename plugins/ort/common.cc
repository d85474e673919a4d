#include "common.h"

#include <sstream>

namespace sigec_ort {

void Fail(const char* op, const std::string& message) { throw OpError(std::string(op) + ": " + message); }

Input ReadInput(const Ort::KernelContext& ctx, size_t index) {
  Input input;
  if (index >= ctx.GetInputCount()) return input;
  Ort::ConstValue value = ctx.GetInput(index);
  if (value == nullptr) return input;
  auto info = value.GetTensorTypeAndShapeInfo();
  input.present = true;
  input.shape = info.GetShape();
  input.type = info.GetElementType();
  input.data = value.GetTensorRawData();
  return input;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

void CheckTensor(const char* op, const char* name, const Input& input, size_t rank,
                 ONNXTensorElementDataType type) {
  if (!input.present) Fail(op, std::string("input '") + name + "' is required");
  if (input.type != type) Fail(op, std::string("input '") + name + "' has the wrong element type");
  if (input.Rank() != rank) {
    Fail(op, std::string("input '") + name + "' must have rank " + std::to_string(rank) + ", got shape " +
                 ShapeString(input.shape));
  }
}

namespace {

// True when the status is OK; releases a non-null status.
bool Ok(OrtStatus* status) {
  if (status == nullptr) return true;
  Ort::GetApi().ReleaseStatus(status);
  return false;
}

}  // namespace

int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t fallback) {
  int64_t value = 0;
  return Ok(Ort::GetApi().KernelInfoGetAttribute_int64(info, name, &value)) ? value : fallback;
}

float AttrFloat(const OrtKernelInfo* info, const char* name, float fallback) {
  float value = 0.0f;
  return Ok(Ort::GetApi().KernelInfoGetAttribute_float(info, name, &value)) ? value : fallback;
}

std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& fallback) {
  size_t size = 0;
  if (!Ok(Ort::GetApi().KernelInfoGetAttribute_string(info, name, nullptr, &size))) return fallback;
  std::string value(size, '\0');
  if (!Ok(Ort::GetApi().KernelInfoGetAttribute_string(info, name, &value[0], &size))) return fallback;
  value.resize(size > 0 ? size - 1 : 0);  // size counts the terminating NUL
  return value;
}

std::vector<int64_t> AttrInts(const OrtKernelInfo* info, const char* op, const char* name,
                              const std::vector<int64_t>& fallback, bool required) {
  size_t size = 0;
  if (!Ok(Ort::GetApi().KernelInfoGetAttributeArray_int64(info, name, nullptr, &size))) {
    if (required) Fail(op, std::string("attribute '") + name + "' (ints) is required");
    return fallback;
  }
  std::vector<int64_t> value(size);
  if (size > 0 && !Ok(Ort::GetApi().KernelInfoGetAttributeArray_int64(info, name, value.data(), &size))) {
    Fail(op, std::string("cannot read attribute '") + name + "'");
  }
  return value;
}

}  // namespace sigec_ort
