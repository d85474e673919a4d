#include "tile_gather.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "half.h"
#include "prologue_apply.h"
#include "shape_infer.h"

namespace sigec_ort {
namespace {

constexpr const char* kOp = "TileGather";
constexpr int64_t kMaxWindow = int64_t{1} << 16;
constexpr int64_t kMaxStep = int64_t{1} << 16;
constexpr int64_t kMaxOffset = int64_t{1} << 30;
constexpr int64_t kMaxUpsample = 1024;
constexpr int64_t kMaxTileIndex = int64_t{1} << 30;
// Target number of output floats per parallel work item (tile x channel block).
constexpr int64_t kItemFloats = 8192;

enum Source : uint8_t { kZero = 0, kBase = 1, kVals = 2 };

// A run of consecutive window columns of one row that read from one source. `contiguous` runs
// read consecutive source elements starting at `offset`; the others read Plan::offsets. Offsets
// leave out the channel term.
struct Run {
  int32_t col;
  int32_t len;
  Source source;
  bool contiguous;
  int64_t offset;  // source offset of the first element (channel 0)
};

// How each window position of one tile reads its value; shared by all channels of the tile.
struct Plan {
  std::vector<int64_t> offsets;  // [wh * ww], element offset inside the channel-0 source
  std::vector<Run> runs;
  std::vector<int32_t> row_begin;  // [wh + 1] index into runs
  std::vector<int64_t> src_col;    // [ww] scratch: source column or -1
  bool has_zeros = false;          // some run reads zero padding
};

// Everything a worker needs; read-only during the parallel loop.
struct GatherJob {
  const TileGatherAttrs* attrs;
  const void* base;  // float, float16 or bfloat16 elements (the Base reader of GatherItem)
  int64_t batch, channels, height, width;
  const float* vals;  // nullptr when absent
  const int64_t* grid;
  int64_t tile, grid_h, grid_w;
  const int64_t* coords;
  const float* scale;  // nullptr when absent
  bool scale_batched;
  const float* shift;
  bool shift_batched;
  float* out;
  int64_t channel_block, blocks_per_tile;
};

// Resolves, for output tile (b, ty, tx), where every window position reads from (pad mode,
// upsampling, vals or base) and groups each window row into runs of one source.
void BuildPlan(const GatherJob& job, int64_t b, int64_t ty, int64_t tx, Plan* plan) {
  const TileGatherAttrs& a = *job.attrs;
  const int64_t wh = a.window[0], ww = a.window[1], up = a.upsample;
  const int64_t hv = job.height * up, wv = job.width * up;
  const int64_t y0 = ty * a.step[0] + a.offset[0];
  const int64_t x0 = tx * a.step[1] + a.offset[1];
  const int64_t tile_area = job.tile * job.tile;
  plan->offsets.resize(wh * ww);
  plan->runs.clear();
  plan->row_begin.resize(wh + 1);
  plan->src_col.resize(ww);
  for (int64_t j = 0; j < ww; ++j) {
    const int64_t vx = MapPadded(x0 + j, wv, a.pad_mode);
    plan->src_col[j] = vx < 0 ? -1 : vx / up;
  }
  for (int64_t i = 0; i < wh; ++i) {
    plan->row_begin[i] = static_cast<int32_t>(plan->runs.size());
    const int64_t vy = MapPadded(y0 + i, hv, a.pad_mode);
    int64_t* offsets = plan->offsets.data() + i * ww;
    if (vy < 0) {
      plan->runs.push_back(Run{0, static_cast<int32_t>(ww), kZero, true, 0});
      continue;
    }
    const int64_t sy = vy / up;
    const int64_t* grid_row = job.vals ? job.grid + (b * job.grid_h + sy / job.tile) * job.grid_w : nullptr;
    const int64_t base_row = (b * job.channels * job.height + sy) * job.width;
    const int64_t vals_row = (sy % job.tile) * job.tile;
    for (int64_t j = 0; j < ww; ++j) {
      const int64_t sx = plan->src_col[j];
      Source source = kZero;
      int64_t offset = 0;
      if (sx >= 0) {
        const int64_t slot = grid_row ? grid_row[sx / job.tile] : -1;
        if (slot >= 0) {
          source = kVals;
          offset = slot * job.channels * tile_area + vals_row + sx % job.tile;
        } else {
          source = kBase;
          offset = base_row + sx;
        }
      }
      offsets[j] = offset;
      Run* last = plan->runs.size() > static_cast<size_t>(plan->row_begin[i]) ? &plan->runs.back() : nullptr;
      if (last != nullptr && last->source == source) {
        last->contiguous = last->contiguous && (source == kZero || offsets[j - 1] + 1 == offset);
        ++last->len;
      } else {
        plan->runs.push_back(Run{static_cast<int32_t>(j), 1, source, true, offset});
      }
    }
  }
  plan->row_begin[wh] = static_cast<int32_t>(plan->runs.size());
  plan->has_zeros = false;
  for (const Run& run : plan->runs) plan->has_zeros = plan->has_zeros || run.source == kZero;
}

// The channel block of one work item: sources and outputs of channel c0 and their per-channel
// strides. `BaseT` is the element type of `base` (vals and the output are float).
template <typename BaseT>
struct Block {
  int64_t channels;     // c1 - c0
  const BaseT* base;    // base + c0 * base_stride
  int64_t base_stride;  // H * W
  const float* vals;    // vals + c0 * vals_stride, or nullptr
  int64_t vals_stride;  // T * T
  float* out;           // output window of channel c0
  int64_t out_stride;   // wh * ww
};

// Copies `len` floats; short rows (the common case: a tile row plus its halo) are copied inline
// with overlapping 16-byte moves instead of a call to memcpy.
inline void CopyRow(float* dst, const float* src, int64_t len) {
#if defined(__SSE2__)
  if (len >= 4 && len <= 16) {
    for (int64_t k = 0; k + 4 < len; k += 4) _mm_storeu_ps(dst + k, _mm_loadu_ps(src + k));
    _mm_storeu_ps(dst + len - 4, _mm_loadu_ps(src + len - 4));
    return;
  }
#endif
  std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(len));
}

// Copies `len` floats of each of `channels` rows (a contiguous run of a float source).
inline void CopyRuns(float* dst, int64_t dst_stride, const float* src, int64_t src_stride, int64_t channels,
                     int64_t len) {
  if (len == 1) {
    for (int64_t c = 0; c < channels; ++c) dst[c * dst_stride] = src[c * src_stride];
  } else {
    for (int64_t c = 0; c < channels; ++c) CopyRow(dst + c * dst_stride, src + c * src_stride, len);
  }
}

// Copies the raw window values of a channel block following `plan` (zeros where padded), as
// floats: `Base` (half.h) reads the elements of `base`, converting float16/bfloat16 exactly. The
// channel loop is innermost: one run is applied to every channel before the next, so that the
// scattered source lines of many channels are requested together (reads of one channel alone
// wait on memory one line at a time) and the run bookkeeping is paid once per block.
template <typename Base>
void FillBlock(const Plan& plan, int64_t wh, int64_t ww, const Block<typename Base::T>& blk) {
  for (int64_t i = 0; i < wh; ++i) {
    const int64_t* row_offsets = plan.offsets.data() + i * ww;
    for (int32_t r = plan.row_begin[i]; r < plan.row_begin[i + 1]; ++r) {
      const Run& run = plan.runs[r];
      const int64_t len = run.len;
      float* dst = blk.out + i * ww + run.col;
      if (run.source == kZero) {
        for (int64_t c = 0; c < blk.channels; ++c) std::fill_n(dst + c * blk.out_stride, len, 0.0f);
        continue;
      }
      const int64_t* offs = row_offsets + run.col;
      if (run.source == kVals || !Base::kHalf) {
        // float source (vals, or a float base: Base::T is float then)
        const float* src = run.source == kVals ? blk.vals : reinterpret_cast<const float*>(blk.base);
        const int64_t stride = run.source == kVals ? blk.vals_stride : blk.base_stride;
        if (run.contiguous) {
          CopyRuns(dst, blk.out_stride, src + run.offset, stride, blk.channels, len);
        } else {
          for (int64_t c = 0; c < blk.channels; ++c) {
            const float* s = src + c * stride;
            float* d = dst + c * blk.out_stride;
            for (int64_t k = 0; k < len; ++k) d[k] = s[offs[k]];
          }
        }
      } else if constexpr (Base::kHalf) {
        if (run.contiguous) {
          Base::Rows(dst, blk.out_stride, blk.base + run.offset, blk.base_stride, blk.channels, len);
        } else {
          for (int64_t c = 0; c < blk.channels; ++c) {
            const typename Base::T* s = blk.base + c * blk.base_stride;
            float* d = dst + c * blk.out_stride;
            for (int64_t k = 0; k < len; ++k) d[k] = Base::One(s[offs[k]]);
          }
        }
      }
    }
  }
}

// Writes zeros again into the padded positions (the prologue is not applied to padding).
template <typename BaseT>
void ZeroPadding(const Plan& plan, int64_t wh, int64_t ww, const Block<BaseT>& blk) {
  for (int64_t i = 0; i < wh; ++i) {
    for (int32_t r = plan.row_begin[i]; r < plan.row_begin[i + 1]; ++r) {
      const Run& run = plan.runs[r];
      if (run.source != kZero) continue;
      float* dst = blk.out + i * ww + run.col;
      for (int64_t c = 0; c < blk.channels; ++c) std::fill_n(dst + c * blk.out_stride, run.len, 0.0f);
    }
  }
}

// Computes work item `item` = (tile, channel block): raw copy, then the prologue in place.
template <Activation A, bool kAffine, typename Base>
void GatherItem(const GatherJob& job, size_t item) {
  thread_local Plan plan;
  const TileGatherAttrs& a = *job.attrs;
  const int64_t n = static_cast<int64_t>(item) / job.blocks_per_tile;
  const int64_t c0 = static_cast<int64_t>(item) % job.blocks_per_tile * job.channel_block;
  const int64_t c1 = std::min(job.channels, c0 + job.channel_block);
  const int64_t b = job.coords[3 * n], ty = job.coords[3 * n + 1], tx = job.coords[3 * n + 2];
  BuildPlan(job, b, ty, tx, &plan);
  const int64_t wh = a.window[0], ww = a.window[1];
  Block<typename Base::T> blk{};
  blk.channels = c1 - c0;
  blk.base_stride = job.height * job.width;
  blk.base = static_cast<const typename Base::T*>(job.base) + c0 * blk.base_stride;
  blk.vals_stride = job.tile * job.tile;
  blk.vals = job.vals ? job.vals + c0 * blk.vals_stride : nullptr;
  blk.out_stride = wh * ww;
  blk.out = job.out + (n * job.channels + c0) * blk.out_stride;
  FillBlock<Base>(plan, wh, ww, blk);
  if constexpr (A != Activation::kNone || kAffine) {
    for (int64_t c = c0; c < c1; ++c) {
      const float scale = job.scale ? job.scale[job.scale_batched ? b * job.channels + c : c] : 1.0f;
      const float shift = job.shift ? job.shift[job.shift_batched ? b * job.channels + c : c] : 0.0f;
      ApplyPrologue<A, kAffine>(blk.out + (c - c0) * blk.out_stride, blk.out_stride, scale, shift, a.alpha, a.beta);
    }
    if (plan.has_zeros) ZeroPadding(plan, wh, ww, blk);
  }
}

void CheckPerChannel(const char* name, const Input& input, int64_t batch, int64_t channels) {
  if (!input.present) return;
  if (input.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) Fail(kOp, std::string("input '") + name + "' must be float");
  const bool ok = (input.Rank() == 1 && input.Dim(0) == channels) ||
                  (input.Rank() == 2 && input.Dim(0) == batch && input.Dim(1) == channels);
  if (!ok) {
    Fail(kOp, std::string("input '") + name + "' must have shape [C] or [B, C] = [" + std::to_string(batch) + ", " +
                  std::to_string(channels) + "], got " + ShapeString(input.shape));
  }
}

OrtStatusPtr InferShape(const OrtCustomOp*, OrtShapeInferContext* ctx) noexcept {
  return GuardStatus([&] {
    const InferredShape base = InputShape(ctx, 0);
    const InferredShape coords = InputShape(ctx, 3);
    const std::vector<int64_t> window = IntsAttribute(ctx, "window");
    if (!IsBaseType(InputElementType(ctx, 0))) Fail(kOp, "input 'base' must be float, float16 or bfloat16");
    if (base.dims.size() != 4) Fail(kOp, "input 'base' must have rank 4, got " + ShapeString(base.dims));
    if (coords.dims.size() != 2) Fail(kOp, "input 'coords' must have rank 2, got " + ShapeString(coords.dims));
    if (window.size() != 2) Fail(kOp, "attribute 'window' must have 2 values");
    InferredShape out;
    out.dims = {coords.dims[0], base.dims[1], window[0], window[1]};
    out.symbols = {coords.symbols[0], base.symbols[1], "", ""};
    SetFloatOutput(ctx, 0, out);
  });
}

}  // namespace

TileGatherAttrs ReadTileGatherAttrs(const OrtKernelInfo* info) {
  TileGatherAttrs a;
  const auto window = AttrInts(info, kOp, "window", {}, true);
  const auto step = AttrInts(info, kOp, "step", {}, true);
  const auto offset = AttrInts(info, kOp, "offset", {0, 0}, false);
  if (window.size() != 2 || step.size() != 2 || offset.size() != 2) {
    Fail(kOp, "attributes 'window', 'step' and 'offset' must have 2 values each");
  }
  for (int k = 0; k < 2; ++k) {
    if (window[k] < 1 || window[k] > kMaxWindow) Fail(kOp, "attribute 'window' must be in [1, 65536]");
    if (step[k] < 1 || step[k] > kMaxStep) Fail(kOp, "attribute 'step' must be in [1, 65536]");
    if (offset[k] < -kMaxOffset || offset[k] > kMaxOffset) Fail(kOp, "attribute 'offset' is out of range");
    a.window[k] = window[k];
    a.step[k] = step[k];
    a.offset[k] = offset[k];
  }
  a.upsample = AttrInt(info, "upsample", 1);
  if (a.upsample < 1 || a.upsample > kMaxUpsample) Fail(kOp, "attribute 'upsample' must be in [1, 1024]");
  const std::string pad = AttrString(info, "pad_mode", "zeros");
  if (!ParsePadMode(pad, &a.pad_mode)) Fail(kOp, "unknown pad_mode '" + pad + "' (zeros, edge or reflect)");
  const std::string act = AttrString(info, "activation", "none");
  if (!ParseActivation(act, &a.activation)) Fail(kOp, "unknown activation '" + act + "'");
  a.alpha = AttrFloat(info, "alpha", 0.0f);
  a.beta = AttrFloat(info, "beta", 0.0f);
  return a;
}

OrtStatusPtr TileGatherKernel::ComputeV2(OrtKernelContext* context) const {
  return GuardStatus([&] { Compute(context); });
}

void TileGatherKernel::Compute(OrtKernelContext* context) const {
  const Ort::KernelContext ctx(context);
  const Input base = ReadInput(ctx, 0), vals = ReadInput(ctx, 1), grid = ReadInput(ctx, 2);
  const Input coords = ReadInput(ctx, 3), scale = ReadInput(ctx, 4), shift = ReadInput(ctx, 5);
  CheckTensor(kOp, "base", base, 4, base.type);
  if (!IsBaseType(base.type)) Fail(kOp, "input 'base' must be float, float16 or bfloat16");
  CheckTensor(kOp, "coords", coords, 2, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
  const int64_t batch = base.Dim(0), channels = base.Dim(1), height = base.Dim(2), width = base.Dim(3);
  if (coords.Dim(1) != 3) Fail(kOp, "input 'coords' must have shape [N, 3], got " + ShapeString(coords.shape));
  const int64_t n_tiles = coords.Dim(0);
  if (vals.present != grid.present) Fail(kOp, "inputs 'vals' and 'grid' must be given together");
  // The output dtype is base's promoted with vals' (docs/ops.md); these kernels write float32 only.
  if (base.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT && !vals.present) {
    Fail(kOp, "a float16/bfloat16 'base' needs float 'vals' (the output would be half, which these kernels "
              "do not write)");
  }

  GatherJob job{};
  job.attrs = &attrs_;
  job.base = base.data;
  job.batch = batch;
  job.channels = channels;
  job.height = height;
  job.width = width;
  job.coords = coords.Data<int64_t>();
  job.tile = 1;
  if (vals.present) {
    CheckTensor(kOp, "vals", vals, 4, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT);
    CheckTensor(kOp, "grid", grid, 3, ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64);
    const int64_t tile = vals.Dim(2);
    if (vals.Dim(1) != channels || tile < 1 || vals.Dim(3) != tile) {
      Fail(kOp, "input 'vals' must have shape [Ni, C, T, T] with C = " + std::to_string(channels) + ", got " +
                    ShapeString(vals.shape));
    }
    const std::vector<int64_t> expected = {batch, CeilDiv(height, tile), CeilDiv(width, tile)};
    if (grid.shape != expected) {
      Fail(kOp, "input 'grid' must have shape " + ShapeString(expected) + " (B, ceil(H/T), ceil(W/T)), got " +
                    ShapeString(grid.shape));
    }
    const int64_t* g = grid.Data<int64_t>();
    const int64_t slots = vals.Dim(0);
    for (int64_t k = 0, size = expected[0] * expected[1] * expected[2]; k < size; ++k) {
      if (g[k] < -1 || g[k] >= slots) {
        Fail(kOp, "input 'grid' holds slot " + std::to_string(g[k]) + " outside [-1, " + std::to_string(slots) +
                      ") (vals has " + std::to_string(slots) + " tiles)");
      }
    }
    job.vals = vals.Data<float>();
    job.grid = g;
    job.tile = tile;
    job.grid_h = expected[1];
    job.grid_w = expected[2];
  }
  CheckPerChannel("scale", scale, batch, channels);
  CheckPerChannel("shift", shift, batch, channels);
  job.scale = scale.present ? scale.Data<float>() : nullptr;
  job.scale_batched = scale.present && scale.Rank() == 2;
  job.shift = shift.present ? shift.Data<float>() : nullptr;
  job.shift_batched = shift.present && shift.Rank() == 2;

  const int64_t wh = attrs_.window[0], ww = attrs_.window[1];
  auto output = ctx.GetOutput(0, {n_tiles, channels, wh, ww});
  if (n_tiles == 0 || channels == 0) return;
  if (height < 1 || width < 1) Fail(kOp, "input 'base' has an empty spatial size " + ShapeString(base.shape));

  const int64_t hv = height * attrs_.upsample, wv = width * attrs_.upsample;
  for (int64_t n = 0; n < n_tiles; ++n) {
    const int64_t b = job.coords[3 * n], ty = job.coords[3 * n + 1], tx = job.coords[3 * n + 2];
    auto where = [&] {
      return "coords[" + std::to_string(n) + "] = (" + std::to_string(b) + ", " + std::to_string(ty) + ", " +
             std::to_string(tx) + ")";
    };
    if (b < 0 || b >= batch) Fail(kOp, where() + ": batch index outside [0, " + std::to_string(batch) + ")");
    if (ty < 0 || tx < 0 || ty > kMaxTileIndex || tx > kMaxTileIndex) {
      Fail(kOp, where() + ": tile indices must be non-negative");
    }
    const int64_t y0 = ty * attrs_.step[0] + attrs_.offset[0];
    const int64_t x0 = tx * attrs_.step[1] + attrs_.offset[1];
    // A window may lie (partly or wholly) in the padding, e.g. after a folded reflect/edge Pad that
    // grows the map; more than one window away from the map means corrupted coords.
    if (y0 >= hv + wh || y0 + 2 * wh <= 0 || x0 >= wv + ww || x0 + 2 * ww <= 0) {
      Fail(kOp, where() + ": the window [" + std::to_string(y0) + ", " + std::to_string(y0 + wh) + ") x [" +
                    std::to_string(x0) + ", " + std::to_string(x0 + ww) + ") lies outside the " +
                    std::to_string(hv) + " x " + std::to_string(wv) + " (upsampled) map by more than a window");
    }
  }

  job.out = output.GetTensorMutableData<float>();
  job.channel_block = std::max<int64_t>(1, std::min<int64_t>(channels, kItemFloats / (wh * ww)));
  job.blocks_per_tile = CeilDiv(channels, job.channel_block);
  const size_t total = static_cast<size_t>(n_tiles * job.blocks_per_tile);
  const bool affine = job.scale != nullptr || job.shift != nullptr;
  DispatchBase(base.type, [&](auto reader) {
    using Base = decltype(reader);
    DispatchActivation(attrs_.activation, [&](auto act) {
      constexpr Activation A = decltype(act)::value;
      if (affine) {
        ParallelFor(ctx, total, [&job](size_t item) { GatherItem<A, true, Base>(job, item); });
      } else {
        ParallelFor(ctx, total, [&job](size_t item) { GatherItem<A, false, Base>(job, item); });
      }
    });
  });
}

TileGatherOp::TileGatherOp() { OrtCustomOp::InferOutputShapeFn = &InferShape; }

OrtStatusPtr TileGatherOp::CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
  return GuardStatus([&] { *kernel = new TileGatherKernel(ReadTileGatherAttrs(info)); });
}

ONNXTensorElementDataType TileGatherOp::GetInputType(size_t index) const {
  if (index == 0) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float, float16 or bfloat16: checked
  return (index == 2 || index == 3) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}

OrtCustomOpInputOutputCharacteristic TileGatherOp::GetInputCharacteristic(size_t index) const {
  return (index == 0 || index == 3) ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
}

}  // namespace sigec_ort
