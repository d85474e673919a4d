#include "tile_scatter.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "half.h"
#include "shape_infer.h"

namespace sigec_ort {
namespace {

constexpr const char* kOp = "TileScatter";
// Target number of floats copied from `base` per parallel work item.
constexpr int64_t kItemFloats = 65536;
// Outputs at least this large are written with non-temporal stores: they cannot stay in the
// caches anyway, and streaming saves reading every destination line before writing it.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// memcpy with non-temporal stores (SSE2, part of the x86-64 baseline); plain memcpy elsewhere.
void StreamCopy(float* dst, const float* src, size_t count) {
#if defined(__SSE2__)
  size_t i = 0;
  while (i < count && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0) {
    dst[i] = src[i];
    ++i;
  }
  for (; i + 16 <= count; i += 16) {
    const __m128 a = _mm_loadu_ps(src + i), b = _mm_loadu_ps(src + i + 4);
    const __m128 c = _mm_loadu_ps(src + i + 8), d = _mm_loadu_ps(src + i + 12);
    _mm_stream_ps(dst + i, a);
    _mm_stream_ps(dst + i + 4, b);
    _mm_stream_ps(dst + i + 8, c);
    _mm_stream_ps(dst + i + 12, d);
  }
  for (; i < count; ++i) dst[i] = src[i];
  _mm_sfence();  // order the streamed stores before the tile writes that follow
#else
  std::memcpy(dst, src, sizeof(float) * count);
#endif
}

// Everything a worker needs; read-only during the parallel loop.
struct ScatterJob {
  const void* base;  // float, float16 or bfloat16 elements (the Base reader of ScatterItem)
  float* out;
  bool copy_base;
  bool stream;  // copy with non-temporal stores
  int64_t channels, height, width;
  const float* vals;
  int64_t tile, grid_h;
  const int64_t* coords;
  std::vector<int64_t> row_start;  // [B * grid_h + 1]: tiles of tile row (b, ty) are
  std::vector<int64_t> row_tiles;  // row_tiles[row_start[b * grid_h + ty] ...]
  int64_t band_rows;               // tile rows per work item
  int64_t bands;
};

// Work item = (plane b*C + c, band of tile rows): copy the band of `base` (converted to float by
// `Base`, half.h), then write its tiles.
template <typename Base>
void ScatterItem(const ScatterJob& job, size_t item) {
  const int64_t plane_index = static_cast<int64_t>(item) / job.bands;
  const int64_t band = static_cast<int64_t>(item) % job.bands;
  const int64_t b = plane_index / job.channels, c = plane_index % job.channels;
  const int64_t t = job.tile, w = job.width;
  const int64_t tr0 = band * job.band_rows;
  const int64_t tr1 = std::min(job.grid_h, tr0 + job.band_rows);
  const int64_t r0 = tr0 * t, r1 = std::min(job.height, tr1 * t);
  float* out_plane = job.out + plane_index * job.height * w;
  if (job.copy_base) {
    float* dst = out_plane + r0 * w;
    const typename Base::T* src = static_cast<const typename Base::T*>(job.base) + plane_index * job.height * w + r0 * w;
    const size_t count = static_cast<size_t>((r1 - r0) * w);
    if constexpr (Base::kHalf) {
      Base::Span(dst, src, static_cast<int64_t>(count));
    } else if (job.stream) {
      StreamCopy(dst, src, count);
    } else {
      std::memcpy(dst, src, sizeof(float) * count);
    }
  }
  for (int64_t tr = tr0; tr < tr1; ++tr) {
    const int64_t row = b * job.grid_h + tr;
    const int64_t rows = std::min(t, job.height - tr * t);
    for (int64_t k = job.row_start[row]; k < job.row_start[row + 1]; ++k) {
      const int64_t n = job.row_tiles[k];
      const int64_t tx = job.coords[3 * n + 2];
      const size_t cols = static_cast<size_t>(std::min(t, w - tx * t));
      const float* src = job.vals + (n * job.channels + c) * t * t;
      float* dst = out_plane + tr * t * w + tx * t;
      for (int64_t y = 0; y < rows; ++y) std::memcpy(dst + y * w, src + y * t, sizeof(float) * cols);
    }
  }
}

// The output is float: base's dtype promoted with vals' (float), docs/ops.md.
OrtStatusPtr InferShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  return GuardStatus([&] {
    if (!IsBaseType(InputElementType(ctx, 0))) Fail(kOp, "input 'base' must be float, float16 or bfloat16");
    SetFloatOutput(ctx, 0, InputShape(ctx, 0));
  });
}

size_t MayInplace(int** input_index, int** output_index) {
  *input_index = new int[1]{0};
  *output_index = new int[1]{0};
  return 1;
}

void ReleaseInplace(int* input_index, int* output_index) {
  delete[] input_index;
  delete[] output_index;
}

}  // namespace

OrtStatusPtr TileScatterKernel::ComputeV2(OrtKernelContext* context) const {
  return GuardStatus([&] { Compute(context); });
}

void TileScatterKernel::Compute(OrtKernelContext* context) const {
  const Ort::KernelContext ctx(context);
  const Input base = ReadInput(ctx, 0), vals = ReadInput(ctx, 1), coords = ReadInput(ctx, 2);
  CheckTensor(kOp, "base", base, 4, base.type);
  if (!IsBaseType(base.type)) Fail(kOp, "input 'base' must be float, float16 or bfloat16");
  CheckTensor(kOp, "vals", vals, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
  CheckTensor(kOp, "coords", coords, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  const int64_t batch = base.Dim(0), channels = base.Dim(1), height = base.Dim(2), width = base.Dim(3);
  const int64_t n_tiles = coords.Dim(0), tile = vals.Dim(2);
  if (coords.Dim(1) != 3) Fail(kOp, "input 'coords' must have shape [N, 3], got " + ShapeString(coords.shape));
  if (vals.Dim(0) != n_tiles || vals.Dim(1) != channels || vals.Dim(3) != tile || (tile < 1 && n_tiles > 0)) {
    Fail(kOp, "input 'vals' must have shape [N, C, T, T] with N = " + std::to_string(n_tiles) +
                  " (coords) and C = " + std::to_string(channels) + " (base), got " + ShapeString(vals.shape));
  }
  auto output = ctx.GetOutput(0, base.shape);
  if (batch * channels * height * width == 0) return;

  ScatterJob job;
  job.base = base.data;
  job.out = output.GetTensorMutableData<float>();
  job.copy_base = static_cast<const void*>(job.out) != job.base;
  // A half base is converted into a float output of twice its size: never the same buffer.
  if (!job.copy_base && base.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) Fail(kOp, "internal: half base reused as output");
  job.stream = batch * channels * height * width * static_cast<int64_t>(sizeof(float)) >= kStreamBytes;
  job.channels = channels;
  job.height = height;
  job.width = width;
  job.vals = vals.Data<float>();
  job.tile = std::max<int64_t>(tile, 1);  // an empty vals may have T = 0
  job.grid_h = CeilDiv(height, job.tile);
  job.coords = coords.Data<int64_t>();
  const int64_t grid_w = CeilDiv(width, job.tile);

  // Bucket the tiles by tile row (b, ty), validating the coordinates on the way.
  job.row_start.assign(static_cast<size_t>(batch * job.grid_h + 1), 0);
  for (int64_t n = 0; n < n_tiles; ++n) {
    const int64_t b = job.coords[3 * n], ty = job.coords[3 * n + 1], tx = job.coords[3 * n + 2];
    if (b < 0 || b >= batch || ty < 0 || ty >= job.grid_h || tx < 0 || tx >= grid_w) {
      Fail(kOp, "coords[" + std::to_string(n) + "] = (" + std::to_string(b) + ", " + std::to_string(ty) + ", " +
                    std::to_string(tx) + ") is outside the tile grid [" + std::to_string(batch) + ", " +
                    std::to_string(job.grid_h) + ", " + std::to_string(grid_w) + "] of base " +
                    ShapeString(base.shape) + " with tile size " + std::to_string(tile));
    }
    ++job.row_start[b * job.grid_h + ty + 1];
  }
  for (size_t r = 1; r < job.row_start.size(); ++r) job.row_start[r] += job.row_start[r - 1];
  job.row_tiles.resize(static_cast<size_t>(n_tiles));
  std::vector<int64_t> fill(job.row_start.begin(), job.row_start.end() - 1);
  for (int64_t n = 0; n < n_tiles; ++n) {
    job.row_tiles[fill[job.coords[3 * n] * job.grid_h + job.coords[3 * n + 1]]++] = n;
  }

  job.band_rows = std::max<int64_t>(1, std::min<int64_t>(job.grid_h, kItemFloats / (job.tile * width)));
  job.bands = CeilDiv(job.grid_h, job.band_rows);
  const size_t total = static_cast<size_t>(batch * channels * job.bands);
  DispatchBase(base.type, [&](auto reader) {
    using Base = decltype(reader);
    ParallelFor(ctx, total, [&job](size_t item) { ScatterItem<Base>(job, item); });
  });
}

TileScatterOp::TileScatterOp() {
  OrtCustomOp::InferOutputShapeFn = &InferShape;
  OrtCustomOp::GetMayInplace = &MayInplace;
  OrtCustomOp::ReleaseMayInplace = &ReleaseInplace;
}

OrtStatusPtr TileScatterOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo*, void** kernel) const {
  return GuardStatus([&] { *kernel = new TileScatterKernel(); });
}

ONNXTensorElementDataType TileScatterOp::GetInputType(size_t index) const {
  if (index == 0) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float, float16 or bfloat16: checked
  return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

}  // namespace sigec_ort
