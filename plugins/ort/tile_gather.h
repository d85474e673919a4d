// ai.sigec::TileGather (docs/ops.md): gathers the input window of every active output tile from a
// sparse-tile tensor, with a fused per-channel scale/shift + activation prologue.
#pragma once

#include "common.h"
#include "prologue.h"

namespace sigec_ort {

// The validated attributes of one TileGather node.
struct TileGatherAttrs {
  int64_t window[2] = {0, 0};
  int64_t step[2] = {0, 0};
  int64_t offset[2] = {0, 0};
  int64_t upsample = 1;
  PadMode pad_mode = PadMode::kZeros;
  Activation activation = Activation::kNone;
  float alpha = 0.0f;
  float beta = 0.0f;
};

// Reads and validates the attributes of a TileGather node.
TileGatherAttrs ReadTileGatherAttrs(const OrtKernelInfo* info);

// The kernel: immutable after construction, so Compute may run concurrently.
class TileGatherKernel {
 public:
  explicit TileGatherKernel(const TileGatherAttrs& attrs) : attrs_(attrs) {}
  OrtStatusPtr ComputeV2(OrtKernelContext* context) const;

 private:
  void Compute(OrtKernelContext* context) const;
  TileGatherAttrs attrs_;
};

// The op schema: inputs base (float, float16 or bfloat16: half caches, half.h), vals?, grid?, coords,
// scale?, shift? (float); output windows (float; a half base needs vals: docs/ops.md, "Dtypes").
struct TileGatherOp : Ort::CustomOpBase<TileGatherOp, TileGatherKernel, true> {
  TileGatherOp();
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return "TileGather"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const;
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace sigec_ort
