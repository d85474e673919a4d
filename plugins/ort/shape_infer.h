// Output shape inference for the sigec ops, written against the C API so that omitted optional
// inputs are never touched and no exception can escape into ONNX Runtime.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <cstdint>
#include <string>
#include <vector>

namespace sigec_ort {

// A (possibly symbolic) tensor shape as seen by shape inference: value -1 with a name is symbolic.
struct InferredShape {
  std::vector<int64_t> dims;
  std::vector<std::string> symbols;
};

// Shape of input `index`; throws when it is unknown (e.g. an omitted optional input).
InferredShape InputShape(OrtShapeInferContext* ctx, size_t index);

// Element type of input `index`; throws when it is unknown.
ONNXTensorElementDataType InputElementType(OrtShapeInferContext* ctx, size_t index);

// The ints attribute `name`; throws when absent.
std::vector<int64_t> IntsAttribute(OrtShapeInferContext* ctx, const char* name);

// Declares output `index` as a float tensor of `shape`.
void SetFloatOutput(OrtShapeInferContext* ctx, size_t index, const InferredShape& shape);

}  // namespace sigec_ort
