#include "shape_infer.h"

namespace sigec_ort {

InferredShape InputShape(OrtShapeInferContext* ctx, size_t index) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context: never released here
  Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(ctx, index, &info));
  size_t rank = 0;
  Ort::ThrowOnError(api.GetDimensionsCount(info, &rank));
  InferredShape shape;
  shape.dims.resize(rank);
  std::vector<const char*> symbols(rank, nullptr);
  if (rank > 0) {
    Ort::ThrowOnError(api.GetDimensions(info, shape.dims.data(), rank));
    Ort::ThrowOnError(api.GetSymbolicDimensions(info, symbols.data(), rank));
  }
  for (const char* s : symbols) shape.symbols.emplace_back(s ? s : "");
  return shape;
}

ONNXTensorElementDataType InputElementType(OrtShapeInferContext* ctx, size_t index) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context: never released here
  Ort::ThrowOnError(api.ShapeInferContext_GetInputTypeShape(ctx, index, &info));
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  Ort::ThrowOnError(api.GetTensorElementType(info, &type));
  return type;
}

std::vector<int64_t> IntsAttribute(OrtShapeInferContext* ctx, const char* name) {
  const OrtApi& api = Ort::GetApi();
  const OrtOpAttr* attr = nullptr;
  Ort::ThrowOnError(api.ShapeInferContext_GetAttribute(ctx, name, &attr));
  if (attr == nullptr) {
    throw Ort::Exception(std::string("attribute '") + name + "' is required", ORT_INVALID_ARGUMENT);
  }
  size_t size = 0;
  OrtStatus* status = api.ReadOpAttr(attr, ORT_OP_ATTR_INTS, nullptr, 0, &size);
  if (status != nullptr) api.ReleaseStatus(status);  // reports the required size
  std::vector<int64_t> values(size / sizeof(int64_t));
  if (!values.empty()) {
    Ort::ThrowOnError(api.ReadOpAttr(attr, ORT_OP_ATTR_INTS, values.data(), size, &size));
  }
  return values;
}

void SetFloatOutput(OrtShapeInferContext* ctx, size_t index, const InferredShape& shape) {
  const OrtApi& api = Ort::GetApi();
  OrtTensorTypeAndShapeInfo* raw = nullptr;
  Ort::ThrowOnError(api.CreateTensorTypeAndShapeInfo(&raw));
  Ort::TensorTypeAndShapeInfo info(raw);  // owns raw
  Ort::ThrowOnError(api.SetTensorElementType(raw, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT));
  Ort::ThrowOnError(api.SetDimensions(raw, shape.dims.data(), shape.dims.size()));
  std::vector<const char*> symbols;
  for (const std::string& s : shape.symbols) symbols.push_back(s.c_str());
  Ort::ThrowOnError(api.SetSymbolicDimensions(raw, symbols.data(), symbols.size()));
  Ort::ThrowOnError(api.ShapeInferContext_SetOutputTypeShape(ctx, index, raw));
}

}  // namespace sigec_ort
