"""Rules for global reductions of sparse maps (spatial pooling), tried before such nodes become dense islands.

Each rule receives the rewrite context and an original node whose input is a Sparse map and whose
output is not a feature map (e.g. GlobalAveragePool's [B, C, 1, 1]); it raises ``Unsupported`` to
leave the node to the later steps of the decision table.

Incremental global pooling (:func:`rule_spatial_sum`): GlobalAveragePool, and ReduceMean / ReduceSum
over exactly the spatial axes (2, 3) (axes as input or attribute, keepdims 0 or 1), of a Sparse map
``x`` [B, C, H, W] whose tiles on the active cells are ``vals`` [N, C, T, T]. Outside the active tiles
``x`` equals its cached original, so

    reduce(x)[b, c] = reduce(original)[b, c] + k * sum over active tiles n of batch b of
                      sum_ij (vals[n, c, i, j] - original_tile[n, c, i, j]) * valid[n, i, j]

with ``k = 1 / (H * W)`` for a mean, 1 for a sum. ``reduce(original)`` is the node's own output as
the FULL graph computes it (an activation cache), ``original_tile`` a TileGather of the cached map
(T x T windows, step T, offset 0), ``valid`` the positions of a tile inside the map: a tile on the
bottom or right border of a map whose size is not a multiple of T reaches past it, where the gather
reads 0 but ``vals`` hold whatever the op computed there (an Add with a bias is not 0), so those
positions are masked (only emitted when H % T or W % T != 0). Per-batch sums: for batch 1 one
ReduceSum; else a one-hot ``[B, N]`` (Equal of range(B) and the tiles' batch index) MatMul with the
per-tile sums ``[N, C]`` (measured as fast as ScatterND with reduction="add" in ONNX Runtime for
N <= 400, C <= 1280; MatMul is also in every executor's op set).

The result equals the dense reduction up to float rounding (a different summation order) and is
Dense with an unknown region (``Dense(value, None)``): downstream ops treat it like a dense island's
output (approx mode applies it on active tiles; exact mode keeps everything after it dense). The
SPARSE graph reads no full map for it: O(active tiles) work instead of a TileScatter of the whole
map and a dense reduction.

Caveat: ``run(update_cache=True)`` updates map caches tile by tile only; the cached reduction is no
tile map and is not updated (see docs/architecture.md, "Incremental global pooling").
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from sigec.passes._ir_utils import attr, const_array, static_shape
from sigec.passes.sparse_context import RewriteContext, Unsupported, dtype_of, shape_of
from sigec.passes.sparse_forms import Dense, Resolution, Sparse
from sigec.passes.sparse_rules import Rule

SPATIAL_AXES = (2, 3)
FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def _reduced_axes(node: ir.Node) -> tuple[int, ...]:
    """The axes a ReduceMean / ReduceSum reduces (normalised to 0..3); Unsupported unless constant."""
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = const_array(node.inputs[1])
        if axes is None:
            raise Unsupported("reduction axes are not constant")
        axes = [int(a) for a in np.ravel(axes)]
    else:
        axes = [int(a) for a in attr(node, "axes", []) or []]
    if not axes:
        if int(attr(node, "noop_with_empty_axes", 0)):
            raise Unsupported("reduction with no axes is the identity")
        return (0, 1, 2, 3)
    return tuple(sorted({a % 4 for a in axes}))


def _reduction_kind(node: ir.Node) -> str:
    """``mean`` or ``sum`` for a node reducing exactly the spatial axes of a 4-D map, else Unsupported."""
    if node.op_type == "GlobalAveragePool":
        return "mean"
    if _reduced_axes(node) != SPATIAL_AXES:
        raise Unsupported(f"{node.op_type} over axes {list(_reduced_axes(node))}, not exactly the spatial axes "
                          f"{list(SPATIAL_AXES)}")
    return "mean" if node.op_type == "ReduceMean" else "sum"


def _valid_positions(ctx: RewriteContext, res: Resolution, np_dtype: np.dtype) -> ir.Value | None:
    """``[N, 1, T, T]`` (or ``[N, 1, T, 1]`` / ``[N, 1, 1, T]``): 1 where a tile position lies inside the
    map, 0 past its bottom/right border; None when H and W are multiples of T (every position is)."""
    b, t = ctx.graph, res.tile
    factors = []
    for axis, (size, shape) in enumerate(((res.height, [-1, 1, t, 1]), (res.width, [-1, 1, 1, t]))):
        if size % t == 0:
            continue
        cell = b.op("Gather", [ctx.grids.coords(res), b.const(np.array([axis + 1], np.int64), "c:coord_axis")],
                    hint=f"tile_{'yx'[axis]}::{res.name}", axis=1)  # [N, 1]
        first = b.op("Mul", [cell, b.const(np.array(t, np.int64), "c:tile")], hint="tile_origin")
        pixels = b.op("Add", [first, b.const(np.arange(t, dtype=np.int64)[None, :], "c:tile_range")],
                      hint="tile_pixels")  # [N, T]
        inside = b.op("Less", [pixels, b.const(np.array(size, np.int64), "c:map_size")], hint="inside_map")
        as_float = b.op("Cast", [inside], hint="inside_map_f", to=onnx.helper.np_dtype_to_tensor_dtype(np_dtype))
        factors.append(b.op("Reshape", [as_float, b.const(np.array(shape, np.int64), "c:valid_shape")],
                            hint=f"valid_{'yx'[axis]}::{res.name}"))
    if not factors:
        return None
    if len(factors) == 1:
        return factors[0]
    return b.op("Mul", factors, hint=f"valid::{res.name}")


def tile_change(ctx: RewriteContext, form: Sparse, np_dtype: np.dtype, name: str) -> ir.Value:
    """``vals - old`` [N, C, T, T] on the active tiles of the Sparse map ``form`` (``old``: a TileGather of
    its cache), 0 at the positions past the map's bottom/right border; ``name`` names the nodes."""
    res, t, b = form.res, form.res.tile, ctx.graph
    cached_map = ctx.caches.cache(form.source, resolution=res.name)
    old = ctx.tile_gather(Dense(cached_map, None), res, window=(t, t), step=(t, t), offset=(0, 0),
                          hint=f"old_tiles::{name}")
    diff = b.op("Sub", [form.vals, old], hint=f"tile_change::{name}")
    valid = _valid_positions(ctx, res, np_dtype)
    if valid is not None:
        diff = b.op("Mul", [diff, valid], hint=f"tile_change_inside::{name}")
    return diff


def per_batch_sum(ctx: RewriteContext, res: Resolution, per_tile: ir.Value, np_dtype: np.dtype, hint: str
                  ) -> ir.Value:
    """Sum the rows of ``per_tile`` [N, C] per batch item of their tile: [B, C]."""
    b = ctx.graph
    if ctx.batch == 1:
        return b.op("ReduceSum", [per_tile, b.const(np.array([0], np.int64), "c:axis0")], hint=hint, keepdims=1)
    batches = b.const(np.arange(ctx.batch, dtype=np.int64)[:, None], "c:batch_range")  # [B, 1]
    of_tile = b.op("Unsqueeze", [ctx.grids.batch_index(res), b.const(np.array([0], np.int64), "c:axis0")],
                   hint=f"batch_row::{res.name}")  # [1, N]
    one_hot = b.op("Cast", [b.op("Equal", [batches, of_tile], hint=f"batch_eq::{res.name}")],
                   hint=f"batch_one_hot::{res.name}", to=onnx.helper.np_dtype_to_tensor_dtype(np_dtype))
    return b.op("MatMul", [one_hot, per_tile], hint=hint)


def rule_spatial_sum(ctx: RewriteContext, node: ir.Node) -> None:
    """GlobalAveragePool / ReduceMean / ReduceSum over (H, W) of a Sparse map, updated from the active tiles."""
    x, out = node.inputs[0], node.outputs[0]
    form = ctx.forms.get(x)
    if not isinstance(form, Sparse):
        raise Unsupported("the input is not a sparse map")
    kind = _reduction_kind(node)
    xs, os_ = static_shape(x), static_shape(out)
    if xs is None or len(xs) != 4 or os_ is None:
        raise Unsupported("input or output without a static 4-D shape")
    if dtype_of(x) not in FLOAT_TYPES or dtype_of(out) != dtype_of(x):
        raise Unsupported(f"reduction of a {dtype_of(x)} map")
    batch, channels, height, width = xs
    if int(np.prod(os_)) != batch * channels:
        raise Unsupported(f"output shape {list(os_)} is not [B, C] with or without kept axes")
    res = form.res
    np_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype_of(x).value))
    b, t = ctx.graph, res.tile
    name = out.name

    diff = tile_change(ctx, form, np_dtype, x.name)
    per_tile = b.op("ReduceSum", [diff, b.const(np.array(SPATIAL_AXES, np.int64), "c:axes23")],
                    hint=f"tile_sums::{name}", keepdims=0)  # [N, C]
    change = per_batch_sum(ctx, res, per_tile, np_dtype, f"change_sum::{name}")  # [B, C]
    if kind == "mean":
        change = b.op("Mul", [change, b.const(np.array(1.0 / (height * width), np_dtype), "c:inv_area")],
                      hint=f"change_mean::{name}")
    change = b.op("Reshape", [change, b.const(np.array(os_, np.int64), "c:reduced_shape")],
                  hint=f"change::{name}")
    # The resolution is the grid whose active tiles change the reduction (what a whole-cache update
    # of it would go with); the cache itself is [B, C, 1, 1] or [B, C].
    cached = ctx.caches.cache(name, kind="activation", resolution=res.name)
    # A value of its own (not named like the original output, which a model output then copies):
    # so that a whole-cache update could output it next to the model output without a name clash.
    value = b.op("Add", [cached, change], hint=f"reduced::{name}")
    ctx.forms.set(out, Dense(value, None))
    ctx.record.report(node, "sparse", resolution=res.name, tile=t, note="incremental global pooling")


GLOBAL_RULES: dict[str, Rule] = {
    "GlobalAveragePool": rule_spatial_sum,
    "ReduceMean": rule_spatial_sum,
    "ReduceSum": rule_spatial_sum,
}
