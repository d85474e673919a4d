// ai.sigec::TileScatter (docs/ops.md): writes tiles into a copy of the full map.
#pragma once

#include "common.h"

namespace sigec_ort {

// The kernel has no attributes and no state; Compute may run concurrently.
class TileScatterKernel {
 public:
  OrtStatusPtr ComputeV2(OrtKernelContext* context) const;

 private:
  void Compute(OrtKernelContext* context) const;
};

// The op schema: inputs base (float, float16 or bfloat16: half caches, converted by the copy), vals
// (float), coords; output the updated map (float). The output may reuse the buffer of a float `base`
// (ONNX Runtime decides; the kernel then skips the copy).
struct TileScatterOp : Ort::CustomOpBase<TileScatterOp, TileScatterKernel, true> {
  TileScatterOp();
  OrtStatusPtr CreateKernelV2(const OrtApi& api, const OrtKernelInfo* info, void** kernel) const;
  const char* GetName() const { return "TileScatter"; }
  const char* GetExecutionProviderType() const { return "CPUExecutionProvider"; }
  size_t GetInputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetInputType(size_t index) const;
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }
};

}  // namespace sigec_ort
