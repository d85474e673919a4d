// Shared helpers of the sigec ONNX Runtime kernels: errors, inputs, attributes, parallel loops.
#pragma once

#include <onnxruntime_cxx_api.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace sigec_ort {

// An error in the op's inputs or attributes; becomes an ORT_INVALID_ARGUMENT status.
class OpError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws OpError("<op>: <message>").
[[noreturn]] void Fail(const char* op, const std::string& message);

// Runs `body` and converts any exception into an OrtStatus (nullptr on success), so that no C++
// exception ever crosses the C boundary into ONNX Runtime.
template <typename Body>
OrtStatusPtr GuardStatus(Body&& body) noexcept {
  try {
    body();
    return nullptr;
  } catch (const OpError& e) {
    return Ort::GetApi().CreateStatus(ORT_INVALID_ARGUMENT, e.what());
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  } catch (...) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, "sigec ort ops: unknown C++ exception");
  }
}

// One kernel input: its data, shape and element type, or `present == false` when omitted.
struct Input {
  bool present = false;
  const void* data = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;

  int64_t Dim(size_t i) const { return shape[i]; }
  size_t Rank() const { return shape.size(); }
  template <typename T>
  const T* Data() const {
    return static_cast<const T*>(data);
  }
};

// Reads input `index` of the kernel context (absent optional inputs give present == false).
Input ReadInput(const Ort::KernelContext& ctx, size_t index);

// "[2, 3, 4]".
std::string ShapeString(const std::vector<int64_t>& shape);

// Fails unless `input` is present, has rank `rank` and element type `type`.
void CheckTensor(const char* op, const char* name, const Input& input, size_t rank,
                 ONNXTensorElementDataType type);

// Attribute readers. A missing attribute yields `fallback`, or an error when `required`.
int64_t AttrInt(const OrtKernelInfo* info, const char* name, int64_t fallback);
float AttrFloat(const OrtKernelInfo* info, const char* name, float fallback);
std::string AttrString(const OrtKernelInfo* info, const char* name, const std::string& fallback);
std::vector<int64_t> AttrInts(const OrtKernelInfo* info, const char* op, const char* name,
                              const std::vector<int64_t>& fallback, bool required);

// Runs body(i) for i in [0, total) on ONNX Runtime's intra-op thread pool. `body` must not throw;
// should it do so anyway, the exception is caught on the worker and reported here as an error.
template <typename Body>
void ParallelFor(const Ort::KernelContext& ctx, size_t total, const Body& body) {
  if (total == 0) return;
  struct Job {
    const Body* body;
    std::atomic<bool> failed{false};
  } job;
  job.body = &body;
  auto trampoline = [](void* data, size_t i) {
    Job* j = static_cast<Job*>(data);
    try {
      (*j->body)(i);
    } catch (...) {
      j->failed.store(true);
    }
  };
  // Many small batches let the pool balance uneven work items (border tiles are slower).
  const size_t batches = total < 64 ? total : 64;
  ctx.ParallelFor(trampoline, total, batches, &job);
  if (job.failed.load()) throw std::runtime_error("sigec ort ops: a parallel worker failed");
}

// ceil(a / b) for a >= 0, b > 0.
inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace sigec_ort
