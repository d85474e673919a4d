// Entry point of libsigec_ort_ops: registers the ai.sigec domain (version 1) with a session.
//
// Python: onnxruntime.SessionOptions().register_custom_ops_library(path)
#include <mutex>

#include "common.h"
#include "tile_gather.h"
#include "tile_scatter.h"

namespace sigec_ort {
namespace {

constexpr const char* kDomain = "ai.sigec";

// The domain and its ops live for the whole process: sessions keep pointers to them.
OrtCustomOpDomain* SigecDomain() {
  static TileGatherOp gather_op;
  static TileScatterOp scatter_op;
  static OrtCustomOpDomain* domain = [] {
    Ort::CustomOpDomain d(kDomain);
    d.Add(&gather_op);
    d.Add(&scatter_op);
    return d.release();
  }();
  return domain;
}

}  // namespace
}  // namespace sigec_ort

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // Older runtime: report through the oldest API table, which every release provides.
    const OrtApi* old_api = api_base->GetApi(1);
    if (old_api == nullptr) return nullptr;
    return old_api->CreateStatus(ORT_FAIL, "libsigec_ort_ops needs ONNX Runtime >= 1.21 (C API 21)");
  }
  static std::once_flag init_flag;
  std::call_once(init_flag, [api] { Ort::InitApi(api); });
  return sigec_ort::GuardStatus([&] {
    Ort::ThrowOnError(Ort::GetApi().AddCustomOpDomain(options, sigec_ort::SigecDomain()));
  });
}
