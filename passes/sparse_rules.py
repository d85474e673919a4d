"""One rewrite rule per op type: how a node whose inputs are sparse-tile tensors is computed on tiles.

Each rule receives the rewrite context and an original node whose inputs depend on the edit, emits
the SPARSE-graph nodes, and records the form of every output. A rule raises ``Unsupported`` when
the node's attributes are outside what it handles; the driver then keeps the node dense (or
reports it). See docs/architecture.md for the geometry of each rule.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir

from sigec.core.resize_rules import nearest_source_index
from sigec.passes._ir_utils import attr, const_array, static_shape
from sigec.passes.group_norm_match import NormMatch
from sigec.passes.sparse_context import RewriteContext, Unsupported, shape_of
from sigec.passes.sparse_forms import Dense, Form, GatherSource, MaskId, Padded, Prologue, Resolution, Sparse, View

Rule = Callable[[RewriteContext, ir.Node], None]

UNARY_ELEMENTWISE = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus", "Softsign",
    "Exp", "Log", "Sqrt", "Neg", "Abs", "Erf", "Reciprocal", "Floor", "Ceil", "Round", "Sin", "Cos", "Gelu",
    "Mish", "Celu", "ThresholdedRelu", "Not", "IsNaN", "Sign",
}
NARY_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal",
                    "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Mod", "Clip"}
PASS_THROUGH = {"Identity", "Dropout"}
# The nearest Resize coordinate modes whose geometry the rule derives (others stay dense).
NEAREST_COORDINATE_MODES = ("asymmetric", "align_corners", "half_pixel", "pytorch_half_pixel")

# Activations TileGather can apply in its prologue, with their (alpha, beta) from the node.
FUSABLE_ACTIVATIONS: dict[str, Callable[[ir.Node], tuple[str, float, float]]] = {
    "Relu": lambda n: ("relu", 0.0, 0.0),
    "LeakyRelu": lambda n: ("leaky_relu", float(attr(n, "alpha", 0.01)), 0.0),
    "Sigmoid": lambda n: ("sigmoid", 0.0, 0.0),
    "Tanh": lambda n: ("tanh", 0.0, 0.0),
    "HardSigmoid": lambda n: ("hard_sigmoid", float(attr(n, "alpha", 0.2)), float(attr(n, "beta", 0.5))),
    "HardSwish": lambda n: ("hard_swish", 0.0, 0.0),
}


def _out_res(ctx: RewriteContext, node: ir.Node) -> Resolution:
    out = node.outputs[0]
    if not ctx.grids.is_spatial(out):
        raise Unsupported(f"output shape {static_shape(out)} is not a feature map")
    return ctx.grids.res_of(out)


def _pair(values: list[int] | None, default: int) -> list[int]:
    return [int(v) for v in values] if values else [default, default]


def _pads4(node: ir.Node) -> list[int]:
    if (attr(node, "auto_pad", "NOTSET") or "NOTSET") != "NOTSET":
        raise Unsupported("auto_pad other than NOTSET")
    pads = attr(node, "pads")
    return [int(p) for p in pads] if pads else [0, 0, 0, 0]


def _optional_inputs(ctx: RewriteContext, node: ir.Node, first: int) -> list[ir.Value]:
    """SPARSE values of the constant inputs ``first..`` (weights, bias) that are present."""
    return [ctx.forms.get(v).value for v in node.inputs[first:] if v is not None]  # type: ignore[union-attr]


def _window_source(ctx: RewriteContext, node: ir.Node, pads: list[int]) -> tuple[GatherSource, list[int]]:
    """What a window op's gather reads, and the node's pads plus those of a folded Pad."""
    src = ctx.gather_source(ctx.forms.get(node.inputs[0]))
    if any(src.pads):
        if src.pad_mode != "zeros" and any(pads):
            raise Unsupported("a reflect/edge Pad followed by a convolution that also zero-pads")
        pads = [p + q for p, q in zip(pads, src.pads)]
    return src, pads


def _input_mask(ctx: RewriteContext, node: ir.Node) -> MaskId | None:
    form = ctx.forms.get(node.inputs[0])
    if isinstance(form, Padded):
        form = form.inner
    return form.mask


def _in_size(ctx: RewriteContext, node: ir.Node) -> list[int]:
    form = ctx.forms.get(node.inputs[0])
    s = shape_of(node.inputs[0])
    if isinstance(form, Padded):
        return [s[2] - form.pads[0] - form.pads[2], s[3] - form.pads[1] - form.pads[3]]
    return [s[2], s[3]]


def _window_mask(ctx: RewriteContext, src: MaskId | None, in_size: Sequence[int], kernel: Sequence[int],
                 strides: Sequence[int], pads: Sequence[int], dilations: Sequence[int], res: Resolution,
                 pad_mode: str) -> MaskId | None:
    """Receptive field of a window op over its input padded by ``pads`` in ``pad_mode``.

    Reflected or replicated padding copies pixels up to ``max(pads)`` inside the border, so the
    field is widened by that much on every side (conservative, exact-mode safe).
    """
    if pad_mode == "zeros":
        return ctx.masks.window(src, in_size, kernel, strides, pads, dilations, res.size)
    m = max(pads)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    return ctx.masks.window(src, in_size, [e + 2 * m for e in span], strides, [p + m for p in pads], [1, 1],
                            res.size)


def _sliding_window(ctx: RewriteContext, node: ir.Node, kernel: list[int], strides: list[int],
                    dilations: list[int], pads: list[int], emit_op: Callable[[ir.Value], ir.Value],
                    macs_per_pixel: int, dense_macs: int = 0) -> None:
    """Shared rule of Conv and pooling: gather (T-1)*s + (k-1)*d + 1 windows, run the op with pads 0."""
    res = _out_res(ctx, node)
    src, pads = _window_source(ctx, node, pads)
    span = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    window = [(res.tile - 1) * s + e for s, e in zip(strides, span)]
    step = [res.tile * s for s in strides]
    g = ctx.tile_gather(src.form, res, window=window, step=step, offset=[-pads[0], -pads[1]], pad_mode=src.pad_mode,
                        upsample=src.upsample, prologue=src.prologue, hint=f"win::{node.name}")
    vals = emit_op(g)
    # The input's own mask already includes any fused upsampling.
    mask = _window_mask(ctx, _input_mask(ctx, node), _in_size(ctx, node), kernel, strides, pads, dilations, res,
                        src.pad_mode)
    ctx.set_sparse(node.outputs[0], vals, res, mask)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile, window=window, dense_macs=dense_macs,
                      macs_per_tile=macs_per_pixel * res.tile * res.tile)


# A convolution whose weights exceed the last-level cache re-reads them from memory for every tile
# when ONNX Runtime loops its Conv over the tiles (batch items); one GEMM over the patches of all
# tiles reads them once. Measured on this machine's 32 MiB L3 (2 threads, 3x3, 2-px tiles, 8-128
# tiles): 1280 channels (59 MiB of weights) 1.3-1.75x faster as a GEMM, 640 channels (15 MiB)
# 0.85x; 4-px tiles at 1280 channels 1.12x, but the fused GauGAN's 1024-channel convs on 4-px tiles
# ran 5% slower as GEMMs end to end (BENCHMARKS.md, "Wide convolutions as one GEMM"): 2-px tiles only.
GEMM_CONV_MIN_WEIGHT_BYTES = 32 * 2**20
GEMM_CONV_MAX_TILE = 2


def _conv_as_gemm(ctx: RewriteContext, node: ir.Node, tile: int, strides: list[int], dilations: list[int],
                  group: int) -> bool:
    """Whether the tiles' Conv runs as one GEMM over their patches (see GEMM_CONV_MIN_WEIGHT_BYTES)."""
    weight = const_array(node.inputs[1])
    return (weight is not None and weight.dtype == np.float32 and weight.nbytes >= GEMM_CONV_MIN_WEIGHT_BYTES
            and tile <= GEMM_CONV_MAX_TILE and group == 1 and strides == [1, 1] and dilations == [1, 1])


def _emit_conv_as_gemm(ctx: RewriteContext, node: ir.Node, g: ir.Value, kernel: list[int], tile: int) -> ir.Value:
    """A stride-1 Conv (pads 0) of windows ``g [M, C, t+kh-1, t+kw-1]`` as patches ``[M*t*t, C*kh*kw]``
    (one Gather of the window positions) times the weights ``[Cout, C*kh*kw]`` (a view of the Conv's)."""
    weight = const_array(node.inputs[1])
    assert weight is not None
    cout, cin = int(weight.shape[0]), int(weight.shape[1])
    wh, ww = tile + kernel[0] - 1, tile + kernel[1] - 1
    positions = np.array([[(oy + ky) * ww + ox + kx for oy in range(tile) for ox in range(tile)]
                          for ky in range(kernel[0]) for kx in range(kernel[1])], np.int64)  # [kh*kw, t*t]
    b, name = ctx.graph, node.outputs[0].name
    flat = b.op("Reshape", [g, b.const(np.array([-1, cin, wh * ww], np.int64), "shape::window")], hint=f"win_flat::{name}")
    taps = b.op("Gather", [flat, b.const(positions, f"patch_positions_{tile}x{kernel[0]}x{kernel[1]}")],
                hint=f"taps::{name}", axis=2)  # [M, C, kh*kw, t*t]
    by_pixel = b.op("Transpose", [taps], hint=f"taps_t::{name}", perm=[0, 3, 1, 2])  # [M, t*t, C, kh*kw]
    patches = b.op("Reshape", [by_pixel, b.const(np.array([-1, cin * kernel[0] * kernel[1]], np.int64), "shape::patches")],
                   hint=f"patches::{name}")
    matrix = b.const(weight.reshape(cout, -1), f"gemm_weight::{node.inputs[1].name}")
    bias = _optional_inputs(ctx, node, 2)
    rows = b.op("Gemm", [patches, matrix, *bias], hint=f"gemm::{name}", transB=1)  # [M*t*t, Cout]
    pixels = b.op("Reshape", [rows, b.const(np.array([-1, tile, tile, cout], np.int64), "shape::pixels")],
                  hint=f"rows::{name}")
    return b.op("Transpose", [pixels], hint=f"vals::{name}", perm=[0, 3, 1, 2])


def rule_conv(ctx: RewriteContext, node: ir.Node) -> None:
    """Conv: gather windows around the output tiles, then the ordinary Conv with pads 0."""
    weight = node.inputs[1]
    ws = shape_of(weight)
    if len(ws) != 4:
        raise Unsupported("only 2-D convolutions are handled")
    if ctx.forms.is_edit_dependent(weight) or (len(node.inputs) > 2 and ctx.forms.is_edit_dependent(node.inputs[2])):
        raise Unsupported("weights depend on the edited input")
    kernel = [ws[2], ws[3]]
    strides, dilations = _pair(attr(node, "strides"), 1), _pair(attr(node, "dilations"), 1)
    group = int(attr(node, "group", 1))

    def emit(g: ir.Value) -> ir.Value:
        tile = _out_res(ctx, node).tile
        if _conv_as_gemm(ctx, node, tile, strides, dilations, group):
            return _emit_conv_as_gemm(ctx, node, g, kernel, tile)
        return ctx.graph.op("Conv", [g, *_optional_inputs(ctx, node, 1)], hint=f"vals::{node.outputs[0].name}",
                            kernel_shape=kernel, strides=strides, dilations=dilations, group=group, pads=[0, 0, 0, 0])

    out = static_shape(node.outputs[0])  # None: _out_res rejects the node
    dense = int(np.prod(out)) * ws[1] * kernel[0] * kernel[1] if out is not None else 0
    _sliding_window(ctx, node, kernel, strides, dilations, _pads4(node), emit, ws[0] * ws[1] * kernel[0] * kernel[1],
                    dense)


def rule_pool(ctx: RewriteContext, node: ir.Node) -> None:
    """MaxPool / AveragePool without padding: gather windows, pool with pads 0."""
    kernel = [int(k) for k in attr(node, "kernel_shape")]
    strides = _pair(attr(node, "strides"), 1)
    pads = _pads4(node)
    dilated = any(d != 1 for d in attr(node, "dilations") or [])
    if any(pads) or int(attr(node, "ceil_mode", 0)) or dilated:
        raise Unsupported("pooling with padding, ceil_mode or dilation")
    if len(node.outputs) > 1 and node.outputs[1].uses():
        raise Unsupported("MaxPool indices output is used")

    def emit(g: ir.Value) -> ir.Value:
        return ctx.graph.op(node.op_type, [g], hint=f"vals::{node.outputs[0].name}", kernel_shape=kernel,
                            strides=strides)

    _sliding_window(ctx, node, kernel, strides, [1, 1], pads, emit, 0)


def rule_conv_transpose(ctx: RewriteContext, node: ir.Node) -> None:
    """ConvTranspose: gather the input cells that reach each output tile, ConvTranspose, crop."""
    res = _out_res(ctx, node)
    weight = node.inputs[1]
    ws = shape_of(weight)
    kernel = [ws[2], ws[3]]
    strides = _pair(attr(node, "strides"), 1)
    if attr(node, "dilations") and any(d != 1 for d in attr(node, "dilations")):
        raise Unsupported("dilated ConvTranspose")
    if attr(node, "output_shape"):
        raise Unsupported("ConvTranspose with output_shape")
    pads = _pads4(node)
    group = int(attr(node, "group", 1))
    form = ctx.forms.get(node.inputs[0])
    if isinstance(form, Padded):  # Pad folds only into Conv and pooling, so this is a guard
        raise Unsupported("ConvTranspose on a virtual Pad")
    # A nearest-upsampled view is read through the gather's upsampling, like Conv does.
    src = ctx.gather_source(form)
    offset, window, crop = [], [], []
    for axis in range(2):
        s, k, p = strides[axis], kernel[axis], pads[axis]
        if res.tile % s or k < s:
            raise Unsupported(f"tile {res.tile} not divisible by stride {s}, or kernel smaller than stride")
        first = math.ceil((p - k + 1) / s)
        last = (res.tile - 1 + p) // s
        offset.append(first)
        window.append(last - first + 1)
        crop.append(p - s * first)
    g = ctx.tile_gather(src.form, res, window=window, step=[res.tile // s for s in strides], offset=offset,
                        upsample=src.upsample, prologue=src.prologue, hint=f"win::{node.name}")
    b = ctx.graph
    full = b.op("ConvTranspose", [g, *_optional_inputs(ctx, node, 1)], hint=f"ct::{node.name}", kernel_shape=kernel,
                strides=strides, group=group, pads=[0, 0, 0, 0])
    vals = b.op("Slice", [full, b.const(np.array(crop, np.int64), "c:crop_start"),
                          b.const(np.array([c + res.tile for c in crop], np.int64), "c:crop_end"),
                          b.const(np.array([2, 3], np.int64), "c:axes23")], hint=f"vals::{node.outputs[0].name}")
    # The view's own mask already includes the upsampling (the inner form's is at the lower resolution).
    mask = ctx.masks.transpose_window(form.mask, kernel, strides, pads, res.size)
    ctx.set_sparse(node.outputs[0], vals, res, mask)
    cin = shape_of(node.inputs[0])
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile, window=window,
                      dense_macs=int(np.prod(cin)) * ws[1] * kernel[0] * kernel[1],
                      macs_per_tile=int(np.prod(window)) * ws[0] * ws[1] * kernel[0] * kernel[1])


def _nearest_geometry(node: ir.Node) -> tuple[int, int, int]:
    """(upsample factor, downsample stride, offset) with ``out[o] = in[(o * stride + offset) // upsample]``."""
    ins, outs = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if ins[0] != outs[0] or ins[1] != outs[1]:
        raise Unsupported("Resize over batch or channels")
    ctm = attr(node, "coordinate_transformation_mode", "half_pixel") or "half_pixel"
    nearest_mode = attr(node, "nearest_mode", "round_prefer_floor") or "round_prefer_floor"
    if node.op_type == "Upsample":
        ctm, nearest_mode = "asymmetric", "floor"
    if ctm not in NEAREST_COORDINATE_MODES:
        raise Unsupported(f"nearest Resize with coordinate_transformation_mode {ctm}")
    found = []
    for axis in (2, 3):
        n_in, n_out = ins[axis], outs[axis]
        idx = nearest_source_index(n_out, n_in, ctm, nearest_mode)
        o = np.arange(n_out)
        if n_out % n_in == 0 and np.array_equal(idx, o // (n_out // n_in)):
            found.append((n_out // n_in, 1, 0))
        elif n_in % n_out == 0 and np.array_equal(idx, o * (n_in // n_out) + idx[0]):
            found.append((1, n_in // n_out, int(idx[0])))
        else:
            raise Unsupported(f"nearest Resize from {ins[2:]} to {outs[2:]} ({ctm}/{nearest_mode}) is not an "
                              f"integer up- or downscale")
    if found[0] != found[1]:
        raise Unsupported("nearest Resize with different factors per axis")
    return found[0]


def _resize_factor(node: ir.Node) -> int:
    ins, outs = shape_of(node.inputs[0]), shape_of(node.outputs[0])
    if ins[0] != outs[0] or ins[1] != outs[1]:
        raise Unsupported("Resize over batch or channels")
    fy, ry = divmod(outs[2], ins[2])
    fx, rx = divmod(outs[3], ins[3])
    if ry or rx or fy != fx or fy < 1:
        raise Unsupported(f"Resize from {ins[2:]} to {outs[2:]} is not an integer, equal-axis upscale")
    return fy


def _rule_nearest(ctx: RewriteContext, node: ir.Node, res: Resolution, form: Sparse | Dense) -> None:
    """Nearest Resize: an upscale is a gather with ``upsample``; an integer downscale picks every f-th pixel."""
    u, f, off = _nearest_geometry(node)
    src = ctx.gather_source(form)
    if f == 1:
        vals = ctx.tile_gather(src.form, res, window=[res.tile] * 2, step=[res.tile] * 2, offset=[0, 0],
                               upsample=u * src.upsample, prologue=src.prologue, hint=f"vals::{node.outputs[0].name}")
        mask = ctx.masks.upsample(form.mask, [u, u], res.size)
        ctx.set_sparse(node.outputs[0], vals, res, mask, View(form, None, u) if isinstance(form, Sparse) else None)
        ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile, note=f"nearest x{u}")
        return
    window = (res.tile - 1) * f + 1
    g = ctx.tile_gather(src.form, res, window=[window] * 2, step=[res.tile * f] * 2, offset=[off, off],
                        upsample=src.upsample, prologue=src.prologue, hint=f"win::{node.name}")
    b = ctx.graph
    vals = b.op("Slice", [g, b.const(np.array([0, 0], np.int64), "c:zero2"),
                          b.const(np.array([window, window], np.int64), "c:win_end"),
                          b.const(np.array([2, 3], np.int64), "c:axes23"),
                          b.const(np.array([f, f], np.int64), "c:steps")], hint=f"vals::{node.outputs[0].name}")
    in_size = list(shape_of(node.inputs[0])[2:])
    mask = ctx.masks.window(form.mask, in_size, [off + 1] * 2, [f, f], [0, 0, 0, 0], [1, 1], res.size)
    ctx.set_sparse(node.outputs[0], vals, res, mask)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile, window=[window] * 2, note=f"nearest /{f}")


def rule_resize(ctx: RewriteContext, node: ir.Node) -> None:
    """Resize by an integer factor: nearest is a gather with ``upsample``; bilinear resizes a haloed window."""
    res = _out_res(ctx, node)
    mode = attr(node, "mode", "nearest") or "nearest"
    ctm = attr(node, "coordinate_transformation_mode", "half_pixel") or "half_pixel"
    if node.op_type == "Upsample":
        ctm = "asymmetric"
    form = ctx.forms.get(node.inputs[0])
    if isinstance(form, Padded):
        raise Unsupported("Resize of a padded tensor")
    if mode == "nearest":
        _rule_nearest(ctx, node, res, form)
        return
    u = _resize_factor(node)
    if mode != "linear" or ctm not in ("half_pixel", "pytorch_half_pixel"):
        raise Unsupported(f"Resize mode {mode} with {ctm}")
    if res.tile % u:
        raise Unsupported(f"tile {res.tile} not divisible by the upscale factor {u}")
    low = res.tile // u
    src = ctx.gather_source(form)
    # a nearest-upsampled view is read through the gather's upsampling (edge padding applies to the view)
    g = ctx.tile_gather(src.form, res, window=[low + 2] * 2, step=[low] * 2, offset=[-1, -1], pad_mode="edge",
                        upsample=src.upsample, prologue=src.prologue, hint=f"win::{node.name}")
    b = ctx.graph
    scales = b.const(np.array([1, 1, u, u], np.float32), "c:scales")
    up = b.op("Resize", [g, None, scales], hint=f"up::{node.name}", mode="linear",
              coordinate_transformation_mode="half_pixel")
    vals = b.op("Slice", [up, b.const(np.array([u, u], np.int64), "c:start"),
                          b.const(np.array([u + res.tile] * 2, np.int64), "c:end"),
                          b.const(np.array([2, 3], np.int64), "c:axes23")], hint=f"vals::{node.outputs[0].name}")
    mask = ctx.masks.upsample(form.mask, [u, u], res.size, halo=1)
    ctx.set_sparse(node.outputs[0], vals, res, mask)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile, window=[low + 2] * 2, note=f"bilinear x{u}")


def rule_depth_to_space(ctx: RewriteContext, node: ir.Node) -> None:
    """DepthToSpace: gather T/r low-resolution cells per tile, then DepthToSpace."""
    res = _out_res(ctx, node)
    r = int(attr(node, "blocksize"))
    if res.tile % r:
        raise Unsupported(f"tile {res.tile} not divisible by blocksize {r}")
    src = ctx.gather_source(ctx.forms.get(node.inputs[0]))
    if src.upsample != 1 or any(src.pads):
        raise Unsupported("DepthToSpace of an upsampled or padded view")
    low = res.tile // r
    g = ctx.tile_gather(src.form, res, window=[low, low], step=[low, low], offset=[0, 0], prologue=src.prologue,
                        hint=f"win::{node.name}")
    vals = ctx.graph.op("DepthToSpace", [g], hint=f"vals::{node.outputs[0].name}", blocksize=r,
                        mode=attr(node, "mode", "DCR") or "DCR")
    mask = ctx.masks.upsample(src.form.mask, [r, r], res.size)
    ctx.set_sparse(node.outputs[0], vals, res, mask)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile)


def rule_space_to_depth(ctx: RewriteContext, node: ir.Node) -> None:
    """SpaceToDepth: gather T*r cells per tile, then SpaceToDepth."""
    res = _out_res(ctx, node)
    r = int(attr(node, "blocksize"))
    src = ctx.gather_source(ctx.forms.get(node.inputs[0]))
    if src.upsample != 1 or any(src.pads):
        raise Unsupported("SpaceToDepth of an upsampled or padded view")
    g = ctx.tile_gather(src.form, res, window=[res.tile * r] * 2, step=[res.tile * r] * 2, offset=[0, 0],
                        prologue=src.prologue, hint=f"win::{node.name}")
    vals = ctx.graph.op("SpaceToDepth", [g], hint=f"vals::{node.outputs[0].name}", blocksize=r)
    mask = ctx.masks.window(src.form.mask, _in_size(ctx, node), [r, r], [r, r], [0, 0, 0, 0], [1, 1], res.size)
    ctx.set_sparse(node.outputs[0], vals, res, mask)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile)


def rule_pad(ctx: RewriteContext, node: ir.Node) -> None:
    """Pad on the spatial axes: kept virtual and folded into the next Conv or pool's gather."""
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    mode = attr(node, "mode", "constant") or "constant"
    if pads is None or pads.size != 8 or (len(node.inputs) > 3 and node.inputs[3] is not None):
        raise Unsupported("Pad without constant 4-D pads")
    p = [int(v) for v in pads]
    if p[0] or p[1] or p[4] or p[5] or min(p) < 0:
        raise Unsupported("Pad of batch/channel axes or negative pad")
    if mode == "constant" and len(node.inputs) > 2 and node.inputs[2] is not None:
        value = const_array(node.inputs[2])
        if value is None or float(value.reshape(-1)[0]) != 0.0:
            raise Unsupported("constant Pad with a non-zero value")
    gather_mode = {"constant": "zeros", "reflect": "reflect", "edge": "edge"}.get(mode)
    if gather_mode is None:
        raise Unsupported(f"Pad mode {mode}")
    inner = ctx.forms.get(node.inputs[0])
    if isinstance(inner, Padded):
        raise Unsupported("two Pads in a row")
    folds = all(use.node.op_type in ("Conv", "MaxPool", "AveragePool") and use.idx == 0
                and (gather_mode == "zeros" or not any(attr(use.node, "pads") or [0]))
                for use in node.outputs[0].uses()) and not node.outputs[0].is_graph_output()
    if not folds:
        _materialized_pad(ctx, node, inner, p, gather_mode)
        return
    ctx.forms.set(node.outputs[0], Padded(inner, (p[2], p[3], p[6], p[7]), gather_mode, node.name))
    ctx.record.report(node, "sparse", note=f"{mode} pad folded into the next gather")


def _materialized_pad(ctx: RewriteContext, node: ir.Node, inner: Sparse | Dense, p: list[int], mode: str) -> None:
    """A Pad whose output is used by other ops: gather it on the padded map's own tile grid."""
    res = _out_res(ctx, node)
    src = ctx.gather_source(inner)
    # The gather's virtual map is the (upsampled) Pad input, so padding applies in its coordinates.
    vals = ctx.tile_gather(src.form, res, window=[res.tile] * 2, step=[res.tile] * 2, offset=[-p[2], -p[3]],
                           pad_mode=mode, upsample=src.upsample, prologue=src.prologue,
                           hint=f"vals::{node.outputs[0].name}")
    in_size = list(shape_of(node.inputs[0])[2:])
    mask = _window_mask(ctx, inner.mask, in_size, [1, 1], [1, 1], [p[2], p[3], p[6], p[7]], [1, 1], res, mode)
    ctx.set_sparse(node.outputs[0], vals, res, mask)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile, note=f"{mode} pad")


def _fused_view(x_form: Form, prologue: Prologue) -> View | None:
    """A view applying ``prologue`` to ``x_form`` if it composes with x's own view."""
    if not isinstance(x_form, Sparse):
        return None
    v = x_form.view
    if v is None:
        return View(x_form, prologue, 1)
    if v.upsample == 1 and v.prologue is not None and v.prologue.activation == "none" and not prologue.has_affine:
        return View(v.inner, Prologue(v.prologue.scale, v.prologue.shift, prologue.activation, prologue.alpha,
                                      prologue.beta), 1)
    return None


def rule_unary(ctx: RewriteContext, node: ir.Node) -> None:
    """Element-wise unary op: the same op on the tiles (activations also become fusable views)."""
    x = node.inputs[0]
    res = _out_res(ctx, node)
    xs = ctx.to_sparse(x, res, node)
    vals = ctx.graph.op(node.op_type, [xs.vals], hint=f"vals::{node.outputs[0].name}",
                        attributes=node.attributes)
    view = None
    if node.op_type in FUSABLE_ACTIVATIONS:
        act, alpha, beta = FUSABLE_ACTIVATIONS[node.op_type](node)
        view = _fused_view(ctx.forms.get(x), Prologue(activation=act, alpha=alpha, beta=beta))
    ctx.set_sparse(node.outputs[0], vals, res, xs.mask, view)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile)


def rule_pass_through(ctx: RewriteContext, node: ir.Node) -> None:
    """Identity / Dropout (inference) / same-type Cast: the output has the input's form.

    A Sparse alias shares the input's tiles and cache (``source`` stays the input's name).
    """
    ctx.forms.set(node.outputs[0], ctx.forms.get(node.inputs[0]))
    ctx.record.report(node, "sparse", note="pass-through")


def rule_cast(ctx: RewriteContext, node: ir.Node) -> None:
    """Cast: pass-through when the type does not change, else an element-wise Cast on tiles."""
    if node.inputs[0].dtype == node.outputs[0].dtype:
        rule_pass_through(ctx, node)
    else:
        rule_unary(ctx, node)


def _silu_source(node: ir.Node) -> ir.Value | None:
    """For ``Mul(a, Sigmoid(a))`` return ``a``."""
    if node.op_type != "Mul" or len(node.inputs) != 2:
        return None
    for i in range(2):
        prod = node.inputs[i].producer() if node.inputs[i] is not None else None
        if prod is not None and prod.op_type == "Sigmoid" and prod.inputs[0] is node.inputs[1 - i]:
            return node.inputs[1 - i]
    return None


def _elementwise_view(ctx: RewriteContext, node: ir.Node) -> View | None:
    """SiLU written as ``Mul(a, Sigmoid(a))`` and a constant Clip become fusable views."""
    a = _silu_source(node)
    if a is not None:
        return _fused_view(ctx.forms.get(a), Prologue(activation="silu"))
    if node.op_type == "Clip":
        lo = const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        hi = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if lo is not None and hi is not None:
            return _fused_view(ctx.forms.get(node.inputs[0]),
                               Prologue(activation="clip", alpha=float(lo), beta=float(hi)))
    return None


def rule_elementwise(ctx: RewriteContext, node: ir.Node) -> None:
    """Element-wise n-ary op: spatial operands as tiles, small operands broadcast (per tile batch)."""
    res = _out_res(ctx, node)
    operands: list[ir.Value | None] = []
    masks: list[MaskId | None] = []
    for value in node.inputs:
        if value is None:
            operands.append(None)
            continue
        if ctx.grids.is_spatial(value) and shape_of(value)[2:] == (res.height, res.width):
            s = ctx.to_sparse(value, res, node)
            operands.append(s.vals)
            masks.append(s.mask)
            continue
        vs = static_shape(value)
        if vs is not None and len(vs) >= 2 and (vs[-1] != 1 or vs[-2] != 1):
            raise Unsupported(f"operand '{value.name}' of shape {list(vs)} broadcasts over the spatial axes")
        if ctx.forms.is_edit_dependent(value):
            if ctx.exact or not isinstance(ctx.forms.get(value), Dense):
                raise Unsupported(f"operand '{value.name}' is a global function of the edited input")
            ctx.record.approximate(node, f"'{value.name}' (a global quantity) is applied only on active tiles")
        operands.append(ctx.broadcast_operand(value, res))
    vals = ctx.graph.op(node.op_type, operands, hint=f"vals::{node.outputs[0].name}",
                        attributes=node.attributes)
    ctx.set_sparse(node.outputs[0], vals, res, ctx.masks.union(masks), _elementwise_view(ctx, node))
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile)


def rule_concat(ctx: RewriteContext, node: ir.Node) -> None:
    """Concat on channels: concatenate the tiles."""
    axis = int(attr(node, "axis", 0))
    if axis not in (1, -3):
        raise Unsupported(f"Concat on axis {axis}")
    res = _out_res(ctx, node)
    parts = [ctx.to_sparse(v, res, node) for v in node.inputs]
    vals = ctx.graph.op("Concat", [p.vals for p in parts], hint=f"vals::{node.outputs[0].name}", axis=1)
    ctx.set_sparse(node.outputs[0], vals, res, ctx.masks.union([p.mask for p in parts]))
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile)


def _channel_ranges(ctx: RewriteContext, node: ir.Node, ranges: list[tuple[int, int, int]]) -> None:
    """Outputs that are channel ranges ``start:stop:step`` of the input: that range of the input's tiles.

    Each output is a value of the original model, so it is Sparse with its own cache (the FULL graph
    outputs it like any activation) and the input's mask: exact in exact mode.
    """
    res = _out_res(ctx, node)
    xs = ctx.to_sparse(node.inputs[0], res, node)
    b = ctx.graph
    for out, (start, stop, step) in zip(node.outputs, ranges):
        vals = b.op("Slice", [xs.vals, b.const(np.array([start], np.int64), "c:ch_start"),
                              b.const(np.array([stop], np.int64), "c:ch_stop"),
                              b.const(np.array([1], np.int64), "c:axis1"),
                              b.const(np.array([step], np.int64), "c:ch_step")], hint=f"vals::{out.name}")
        ctx.set_sparse(out, vals, res, xs.mask)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile, note="channel ranges of the tiles")


def _feature_map_shapes(node: ir.Node) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """Static 4-D shapes of the input and every output (Unsupported otherwise)."""
    shapes = [static_shape(v) for v in [node.inputs[0], *node.outputs]]
    if any(s is None or len(s) != 4 for s in shapes):
        raise Unsupported("input or output is not a 4-D tensor of static shape")
    return shapes[0], shapes[1:]  # type: ignore[return-value]


def rule_split(ctx: RewriteContext, node: ir.Node) -> None:
    """Split along channels (``split`` input or attribute, or ``num_outputs``): each output is a
    channel range of the input tiles. The ranges follow the outputs' inferred shapes, which every
    spelling determines."""
    x, outs = _feature_map_shapes(node)
    if int(attr(node, "axis", 0)) not in (1, -3):
        raise Unsupported(f"Split on axis {attr(node, 'axis', 0)}")
    sizes = [s[1] for s in outs]
    if sum(sizes) != x[1] or min(sizes) < 1:
        raise Unsupported(f"output channels {sizes} do not partition the input's {x[1]}")
    starts = np.cumsum([0, *sizes[:-1]])
    _channel_ranges(ctx, node, [(int(a), int(a) + n, 1) for a, n in zip(starts, sizes)])


def _slice_params(node: ir.Node) -> list[tuple[int, int, int, int]]:
    """``(axis, start, end, step)`` per sliced axis of a Slice whose parameters are constant (the
    frontend converts older opsets, whose Slice has attributes, to opset 18)."""
    given = list(node.inputs[1:5]) + [None] * (5 - len(node.inputs))
    params = [const_array(v) for v in given]
    if given[0] is None or given[1] is None or any(v is not None and p is None for v, p in zip(given, params)):
        raise Unsupported("Slice with non-constant starts, ends, axes or steps")
    starts, ends = [int(v) for v in np.ravel(params[0])], [int(v) for v in np.ravel(params[1])]
    axes = [int(v) for v in np.ravel(params[2])] if params[2] is not None else list(range(len(starts)))
    steps = [int(v) for v in np.ravel(params[3])] if params[3] is not None else [1] * len(starts)
    return list(zip(axes, starts, ends, steps))


def rule_slice(ctx: RewriteContext, node: ir.Node) -> None:
    """Slice with constant parameters that selects channels only (other axes whole, positive steps):
    a channel range of the input tiles. Indices are normalised as ONNX does (negative ones count from
    the end, then clamped)."""
    x, (out,) = _feature_map_shapes(node)
    channels = (0, x[1], 1)
    for axis, start, end, step in _slice_params(node):
        if step < 1:
            raise Unsupported(f"Slice with step {step}")
        bounds = slice(start, end, step).indices(x[axis % 4])  # Python's normalisation is ONNX's for step > 0
        if axis % 4 == 1:
            channels = bounds
        elif bounds != (0, x[axis % 4], 1):
            raise Unsupported(f"Slice of axis {axis} (only channel ranges run on tiles)")
    kept = len(range(*channels))
    if kept != out[1] or kept < 1:
        raise Unsupported(f"Slice keeps {kept} channels, its output has {out[1]}")
    _channel_ranges(ctx, node, [channels])


def rule_batchnorm(ctx: RewriteContext, node: ir.Node) -> None:
    """Inference BatchNormalization (not folded into a Conv): a per-channel affine on tiles."""
    params = [const_array(v) for v in node.inputs[1:5]]
    if any(p is None for p in params):
        raise Unsupported("BatchNormalization with non-constant parameters")
    scale, bias, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
    s = scale / np.sqrt(var + float(attr(node, "epsilon", 1e-5)))
    t = bias - mean * s
    s32, t32 = s.astype(np.float32), t.astype(np.float32)
    res = _out_res(ctx, node)
    xs = ctx.to_sparse(node.inputs[0], res, node)
    b = ctx.graph
    sc, sh = b.const(s32, "c:bn_scale"), b.const(t32, "c:bn_shift")
    sc4, sh4 = b.const(s32.reshape(-1, 1, 1), "c:bn_scale4"), b.const(t32.reshape(-1, 1, 1), "c:bn_shift4")
    vals = b.op("Add", [b.op("Mul", [xs.vals, sc4], hint="bn_mul"), sh4], hint=f"vals::{node.outputs[0].name}")
    view = _fused_view(ctx.forms.get(node.inputs[0]), Prologue(scale=sc, shift=sh))
    ctx.set_sparse(node.outputs[0], vals, res, xs.mask, view)
    ctx.record.report(node, "sparse", resolution=res.name, tile=res.tile, note="per-channel affine")


def rule_frozen_norm(ctx: RewriteContext, match: NormMatch, reason: str = "") -> None:
    """Group/instance normalisation (approx mode): ``y = x * scale[b, c] + shift[b, c]`` on tiles, with the
    statistics frozen by the FULL graph; a fusable view when ``x`` has no view of its own. ``reason``: why
    updated statistics (``norm_stats="updated"``) were not used, for the report."""
    x = match.x
    res = ctx.grids.res_of(match.y)
    xs = ctx.to_sparse(x, res, match.nodes[0])
    scale, shift = ctx.caches.frozen_stats(match, ctx.batch, shape_of(x)[1])
    apply_norm(ctx, match, xs, scale, shift, "normalisation with frozen statistics" + (f" ({reason})" if reason else ""))
    ctx.record.approximate(match.nodes[0], f"normalisation of '{x.name}' uses statistics frozen from the original")


def apply_norm(ctx: RewriteContext, match: NormMatch, xs: Sparse, scale: ir.Value, shift: ir.Value, note: str) -> None:
    """``y = x * scale[b, c] + shift[b, c]`` on the tiles ``xs`` of ``match``'s input (``scale``, ``shift``:
    [B, C]); ``y`` is also a fusable view (the affine as the next gather's prologue) when ``x`` has no
    view of its own. Reports the match's nodes as approx with ``note``."""
    x, y = match.x, match.y
    res = xs.res
    b = ctx.graph
    per_tile_shape = b.const(np.array([-1, shape_of(x)[1], 1, 1], np.int64), "c:per_tile_shape")
    s4 = b.op("Reshape", [b.op("Gather", [scale, ctx.grids.batch_index(res)], hint="scale_per_tile", axis=0),
                          per_tile_shape], hint="scale4")
    t4 = b.op("Reshape", [b.op("Gather", [shift, ctx.grids.batch_index(res)], hint="shift_per_tile", axis=0),
                          per_tile_shape], hint="shift4")
    vals = b.op("Add", [b.op("Mul", [xs.vals, s4], hint="norm_mul"), t4], hint=f"vals::{y.name}")
    x_form = ctx.forms.get(x)
    fusable = isinstance(x_form, Sparse) and x_form.view is None
    ctx.set_sparse(y, vals, res, xs.mask, View(x_form, Prologue(scale=scale, shift=shift)) if fusable else None)
    for node in match.nodes:
        ctx.record.report(node, "approx", resolution=res.name, tile=res.tile, note=note)


RULES: dict[str, Rule] = {
    "Conv": rule_conv,
    "ConvTranspose": rule_conv_transpose,
    "MaxPool": rule_pool,
    "AveragePool": rule_pool,
    "Resize": rule_resize,
    "Upsample": rule_resize,
    "DepthToSpace": rule_depth_to_space,
    "SpaceToDepth": rule_space_to_depth,
    "Pad": rule_pad,
    "Concat": rule_concat,
    "Split": rule_split,
    "Slice": rule_slice,
    "BatchNormalization": rule_batchnorm,
    "Cast": rule_cast,
    **{op: rule_unary for op in UNARY_ELEMENTWISE},
    **{op: rule_elementwise for op in NARY_ELEMENTWISE},
    **{op: rule_pass_through for op in PASS_THROUGH},
}
