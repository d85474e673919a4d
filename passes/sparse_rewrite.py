"""The sparse rewrite: from a canonical model to the FULL, SPARSE and DENSE graphs of an engine.

Rewrite rules (per node of the canonical model, in topological order):

1. A node none of whose inputs depends on the model inputs is constant: it is copied into the
   SPARSE graph unchanged.
2. A node that depends only on non-spatial model inputs (a timestep, a class label) is *static*:
   the FULL graph computes it once per cache key and the SPARSE graph reads it as a cache.
3. A node that depends on the edited spatial input(s) and whose op has a rule in
   ``passes/sparse_rules.py`` (convolutions, pooling, resizing, pixel shuffles, pads, element-wise
   ops, channel concat, BatchNorm) is computed on the active tiles of its output's resolution.
4. In approx mode, group and instance normalisation use statistics frozen from the FULL run (a
   per-channel affine on tiles, fused into the next gather).
5. In approx mode, a node with a rule whose output lies on a resolution listed in
   ``dense_resolutions`` runs dense on the full map (its sparse inputs scattered into their cached
   originals); group normalisation there uses its true statistics. Higher resolutions read such
   maps on their active tiles. Small, fully active maps run faster dense than as stacked tiles.
6. Any other node (attention, global pooling, reductions, reshapes) is a *dense island*: its
   sparse inputs are scattered into full maps and it runs unchanged. In exact mode everything
   downstream of an island is dense too (exactness is kept); in approx mode downstream tiles read
   the island's output only on active tiles (recorded as an approximation).
7. A node that fits none of the above is unsupported: a CompileError lists all such nodes, unless
   ``fallback="dense"`` makes them dense islands.
8. Model outputs that are sparse are scattered into their cached original (the one full-size write).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from sigec.core.errors import CompileError
from sigec.core.names import cache_input, coords_input, grid_input
from sigec.core.options import DEFAULT_TILE_SIZE, FALLBACKS, MODES
from sigec.passes._ir_utils import node_label, static_shape
from sigec.passes.graph_builder import SIGEC_DOMAIN, GraphBuilder, make_model
from sigec.passes.group_norm_match import NormMatch, find_norms
from sigec.passes.macs import dense_macs
from sigec.passes.mask_builder import MaskProgramBuilder
from sigec.passes.sparse_context import RewriteContext, StatsRequest, Unsupported
from sigec.passes.sparse_forms import EMPTY_MASK, INPUT_MASK, Dense, Prologue, Sparse, View
from sigec.passes.sparse_rules import RULES
from sigec.passes.stats_graph import add_norm_statistics

# Ops that are well defined as dense islands (global or layout ops) without needing --fallback.
DENSE_ISLAND_OPS = {
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MatMul", "Gemm", "Einsum", "Softmax",
    "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare",
    "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization", "GroupNormalization", "LayerNormalization",
    "Split", "Slice", "Gather", "Shape", "Expand", "Tile", "Attention", "ArgMax", "TopK", "CumSum", "Size",
    "ConstantOfShape", "Range",
}


@dataclass
class RewriteResult:
    """The graphs (weights embedded) and the manifest fields describing them."""

    full: onnx.ModelProto
    sparse: onnx.ModelProto
    dense: onnx.ModelProto
    manifest: dict[str, Any]


def _dtype_name(value: ir.Value) -> str:
    elem = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name


def _spatial_inputs(model: ir.Model) -> tuple[list[ir.Value], int, tuple[int, int]]:
    spatial, batch, size = [], None, None
    for value in model.graph.inputs:
        s = static_shape(value)
        if s is not None and len(s) == 4 and s[2] * s[3] > 1 and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            spatial.append(value)
            if size is not None and (s[2], s[3]) != size:
                raise CompileError(f"spatial inputs must share one size: '{value.name}' is {s[2]}x{s[3]}, "
                                   f"'{spatial[0].name}' is {size[0]}x{size[1]}")
            batch, size = s[0], (s[2], s[3])
    if not spatial:
        names = ", ".join(f"'{v.name}' {static_shape(v)}" for v in model.graph.inputs)
        raise CompileError(f"the model has no spatial input (a float [B, C, H, W] tensor); inputs: {names}")
    return spatial, int(batch), size  # type: ignore[arg-type]


def _copy_node(ctx: RewriteContext, node: ir.Node, input_names: list[str | None]) -> None:
    proto = ir.serde.serialize_node(node)
    del proto.input[:]
    proto.input.extend("" if n is None else n for n in input_names)
    proto.name = ctx.builder.fresh(f"node:{node.name or node.op_type}")
    for out in proto.output:
        if out:
            ctx.builder.reserve(out)
    ctx.builder.nodes.append(proto)


def _dense_rule(ctx: RewriteContext, node: ir.Node, kind: str, note: str, resolution: str | None = None) -> None:
    names = [None if v is None else ctx.to_dense(v) for v in node.inputs]
    _copy_node(ctx, node, names)
    for out in node.outputs:
        if out.name:
            ctx.forms[out.name] = Dense(out.name, None)
    ctx.report(node, kind, dense_macs=dense_macs(node), note=note, **({"resolution": resolution} if resolution else {}))


def _norm_rule(ctx: RewriteContext, match: NormMatch) -> None:
    """Frozen-statistics normalisation: y = x * scale[b, c] + shift[b, c] on tiles."""
    x, y = match.x, match.y
    res = ctx.res_of(y)
    xs = ctx.to_sparse(x, res, match.nodes[0])
    channels = ctx.shape(x)[1]
    scale = ctx.stats_cache(cache_input(f"stats::scale::{x.name}"), f"stats::scale::{x.name}", [ctx.batch, channels])
    shift = ctx.stats_cache(cache_input(f"stats::shift::{x.name}"), f"stats::shift::{x.name}", [ctx.batch, channels])
    ctx.stats.append(StatsRequest(x.name, scale, shift, match))
    b = ctx.builder
    per_tile_shape = b.const(np.array([-1, channels, 1, 1], np.int64), "c:per_tile_shape")
    s4 = b.node1("Reshape", [b.node1("Gather", [scale, ctx.batch_index(res)], hint="scale_per_tile", axis=0),
                             per_tile_shape], hint="scale4")
    t4 = b.node1("Reshape", [b.node1("Gather", [shift, ctx.batch_index(res)], hint="shift_per_tile", axis=0),
                             per_tile_shape], hint="shift4")
    vals = b.node1("Add", [b.node1("Mul", [xs.vals, s4], hint="norm_mul"), t4], hint=f"vals::{y.name}")
    x_form = ctx.form(x)
    view = View(x_form, Prologue(scale=scale, shift=shift)) if isinstance(x_form, Sparse) and x_form.view is None else None
    ctx.set_sparse(y, vals, res, xs.mask, view)
    for node in match.nodes:
        ctx.report(node, "approx", resolution=res.name, tile=res.tile, note="normalisation with frozen statistics")
    ctx.approximate(match.nodes[0], f"normalisation of '{x.name}' uses statistics frozen from the original")


def _classify_inputs(ctx: RewriteContext, node: ir.Node, static: set[str]) -> str:
    """'constant', 'static' or 'edit' for a node, from its inputs."""
    kind = "constant"
    for v in node.inputs:
        if v is None:
            continue
        if ctx.is_edit_dependent(v):
            return "edit"
        if v.name in static:
            kind = "static"
    return kind


def _materialize_static(ctx: RewriteContext, static: set[str], value: ir.Value) -> None:
    if value.name in static and value.name not in ctx.forms:
        ctx.forms[value.name] = Dense(ctx.cache(value.name, kind="static"), EMPTY_MASK)


def _rewrite_nodes(ctx: RewriteContext, model: ir.Model, fallback: str) -> None:
    static: set[str] = set()
    spatial, _, _ = _spatial_inputs(model)
    for value in model.graph.inputs:
        if value in spatial:
            ctx.builder.add_input(value.name, value.dtype.value, list(static_shape(value)))  # type: ignore[union-attr,arg-type]
            ctx.forms[value.name] = Dense(value.name, INPUT_MASK)
        else:
            static.add(value.name)
    norms = find_norms(model) if not ctx.exact else {}
    claimed = {n for m in norms.values() for n in m.nodes}
    unsupported: list[str] = []
    for node in model.graph:
        if node in norms:
            if ctx.is_edit_dependent(norms[node].x) and ctx.dense_resolution_of(norms[node].y.producer()) is None:
                _norm_rule(ctx, norms[node])
                continue
            claimed -= set(norms[node].nodes)
        if node in claimed:
            continue
        kind = _classify_inputs(ctx, node, static)
        if kind == "constant":
            _copy_node(ctx, node, [None if v is None else ctx.form(v).name for v in node.inputs])  # type: ignore[union-attr]
            for out in node.outputs:
                ctx.forms[out.name] = Dense(out.name, EMPTY_MASK)
            ctx.report(node, "constant")
            continue
        if kind == "static":
            static.update(o.name for o in node.outputs)
            ctx.report(node, "static", dense_macs=dense_macs(node))
            continue
        for v in node.inputs:
            if v is not None:
                _materialize_static(ctx, static, v)
        edit_forms = [ctx.form(v) for v in node.inputs if v is not None and ctx.is_edit_dependent(v)]
        island_inputs = [isinstance(f, Dense) and f.mask is None for f in edit_forms]
        if ctx.exact and any(island_inputs):
            _dense_rule(ctx, node, "dense", "downstream of a global op (exact mode)")
            continue
        rule = RULES.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if rule is not None and not any(ctx.is_spatial(o) for o in node.outputs):
            _dense_rule(ctx, node, "dense", "non-spatial values: part of a dense island")
            continue
        if rule is not None and all(island_inputs) and not any(
                ctx.is_spatial(o) and tuple(ctx.shape(o)[2:]) in ctx.resolutions for o in node.outputs):
            # Only island values in, and no feature map of a resolution the edit reaches out (e.g.
            # [B, heads, tokens, dim] tensors inside attention): the island continues.
            _dense_rule(ctx, node, "dense", "inside a dense island")
            continue
        forced = ctx.dense_resolution_of(node) if rule is not None else None
        if forced is not None:
            _dense_rule(ctx, node, "dense", f"resolution {forced} runs dense (dense_resolutions)", forced)
            continue
        if rule is not None:
            try:
                rule(ctx, node)
                continue
            except Unsupported as exc:
                reason = str(exc)
        elif node.op_type in DENSE_ISLAND_OPS and node.domain in ("", "ai.onnx"):
            _dense_rule(ctx, node, "dense", "global op: dense island")
            continue
        else:
            reason = "no sparse rule for this op"
        if fallback == "dense":
            _dense_rule(ctx, node, "dense", f"fallback: {reason}")
            ctx.approximate(node, f"kept dense (--fallback dense): {reason}") if not ctx.exact else None
        else:
            unsupported.append(f"{node_label(node)}: {reason}")
            for out in node.outputs:  # keep walking so that every unsupported node is reported
                ctx.forms[out.name] = Dense(out.name, None)
    if unsupported:
        raise CompileError("unsupported nodes (use --fallback dense to keep them dense):\n  " + "\n  ".join(unsupported))
    for out in model.graph.outputs:
        _materialize_static(ctx, static, out)


def _emit_outputs(ctx: RewriteContext, model: ir.Model) -> None:
    """Model outputs of the SPARSE graph (scattered into their cached original when sparse)."""
    b = ctx.builder
    for out in model.graph.outputs:
        form = ctx.form(out)
        elem = out.dtype.value if out.dtype is not None else onnx.TensorProto.FLOAT
        if isinstance(form, Sparse):
            b.node("TileScatter", [ctx.cache(form.source, resolution=form.res.name), form.vals, ctx.coords(form.res)],
                   hint=out.name, outputs=[b.reserve(out.name)], domain=SIGEC_DOMAIN)
        elif form.name != out.name:  # type: ignore[union-attr]
            b.node("Identity", [form.name], hint=out.name, outputs=[b.reserve(out.name)])  # type: ignore[union-attr]
        b.add_output(out.name, elem, list(static_shape(out) or []))


def _add_update_outputs(ctx: RewriteContext, sparse: onnx.ModelProto) -> list[dict[str, Any]]:
    """For every activation cache the SPARSE graph reads, an output with its recomputed tiles."""
    vals_of = {f.source: f for f in ctx.forms.values() if isinstance(f, Sparse)}
    updates = []
    for cache in ctx.caches.values():
        if cache.kind != "activation" or cache.source not in vals_of:
            continue
        form = vals_of[cache.source]
        name = form.vals  # the tiles themselves are the output: no copy
        if name in {o.name for o in sparse.graph.output}:
            continue
        sparse.graph.output.append(onnx.helper.make_tensor_value_info(
            name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(cache.dtype)),
            [f"n_{form.res.name}", cache.shape[1], form.res.tile, form.res.tile]))
        updates.append({"output": name, "cache": cache.name, "resolution": form.res.name})
    return updates


def _full_graph(model_proto: onnx.ModelProto, ctx: RewriteContext, opset: int) -> onnx.ModelProto:
    """The dense model plus an output for every cache the SPARSE graph reads."""
    full = onnx.ModelProto.FromString(model_proto.SerializeToString())
    graph = full.graph
    builder = GraphBuilder(reserved_names=[v for n in graph.node for v in n.output] + [i.name for i in graph.input]
                           + [t.name for t in graph.initializer])
    existing_outputs = {o.name for o in graph.output}
    input_names = {i.name for i in graph.input}
    for cache in ctx.caches.values():
        if cache.kind == "stats":
            continue
        if cache.source in existing_outputs:
            continue
        if cache.source in input_names:
            continue  # the runtime fills it from the primed inputs
        existing_outputs.add(cache.source)
        graph.output.append(onnx.helper.make_tensor_value_info(
            cache.source, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(cache.dtype)), cache.shape))
    done: set[str] = set()
    for request in ctx.stats:
        if request.x in done or request.scale_cache not in ctx.caches:
            continue
        done.add(request.x)
        add_norm_statistics(builder, request, ctx.batch, ctx.shape(ctx.value_by_name(request.x)), opset)
    graph.node.extend(builder.nodes)
    graph.output.extend(builder.outputs)
    for name, array in builder.constants.items():
        graph.initializer.append(onnx.numpy_helper.from_array(array, name=name))
    return full


def rewrite(model: ir.Model, *, mode: str = "approx", tile_size: int | dict[str, int] = DEFAULT_TILE_SIZE, fallback: str = "error",
            threshold: float = 0.0, dilation: int = 0, approx_dilation: int = 1,
            dense_resolutions: tuple[str, ...] = ()) -> RewriteResult:
    """Rewrite a canonical model into FULL, SPARSE and DENSE graphs plus manifest fields.

    ``dense_resolutions`` (approx mode): resolution names such as ``"r8x8"`` whose nodes run dense.
    """
    if mode not in MODES:
        raise CompileError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if fallback not in FALLBACKS:
        raise CompileError(f"fallback must be one of {', '.join(FALLBACKS)}, not {fallback!r}")
    spatial, batch, size = _spatial_inputs(model)
    if dense_resolutions and mode != "approx":
        raise CompileError("dense_resolutions needs mode='approx' (in exact mode everything downstream of a "
                           "dense map would run dense)")
    for name in dense_resolutions:
        if not re.fullmatch(r"r\d+x\d+", str(name)):
            raise CompileError(f"dense resolution {name!r} is not a resolution name like 'r16x16'")
    model_proto = ir.serde.serialize_model(model)
    reserved = [v.name for v in model.graph.inputs] + [v.name for n in model.graph for v in n.outputs]
    ctx = RewriteContext(model=model, mode=mode, batch=batch, tile_size=tile_size,
                         dense_resolutions=frozenset(dense_resolutions),
                         builder=GraphBuilder(reserved_names=reserved), masks=MaskProgramBuilder(mode == "exact", size))
    _rewrite_nodes(ctx, model, fallback)
    _emit_outputs(ctx, model)
    opset = model.opset_imports.get("", 18)

    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    used = {i for n in ctx.builder.nodes for i in n.input} | {i.name for i in ctx.builder.inputs}
    sparse_inits = {k: v for k, v in initializers.items() if k in used}
    sparse_inits.update(ctx.builder.constants)
    sparse = make_model("sigec_sparse", ctx.builder.nodes, ctx.builder.inputs, ctx.builder.outputs, sparse_inits,
                        list(model_proto.opset_import), with_sigec=True)
    sparse = _remove_dead_nodes(sparse, keep_inputs={v.name for v in spatial})
    sparse_inputs = {i.name for i in sparse.graph.input}
    ctx.caches = {name: c for name, c in ctx.caches.items() if name in sparse_inputs}
    updates = _add_update_outputs(ctx, sparse)

    resolutions = []
    for res in ctx.resolutions.values():
        if coords_input(res.name) not in sparse_inputs and grid_input(res.name) not in sparse_inputs:
            continue
        mask_id = ctx.masks.resolution_mask([res.height, res.width], ctx.res_masks[res.name], approx_dilation)
        resolutions.append({"name": res.name, "size": [res.height, res.width], "tile": res.tile, "mask": mask_id})
    caches = list(ctx.caches.values())
    if mode == "approx" and resolutions:
        ctx.approximations.insert(0, {
            "node": "*", "op_type": "mask",
            "detail": f"SIGE-style masks: each resolution's tiles are the edit resampled and dilated by "
                      f"{approx_dilation} px; changes that convolutions spread further are not recomputed"})
    full = _full_graph(model_proto, ctx, opset)
    dense = model_proto
    manifest = {
        "mode": mode,
        "inputs": [{"name": v.name, "shape": list(static_shape(v) or []), "dtype": _dtype_name(v),
                    "spatial": v in spatial} for v in model.graph.inputs],
        "outputs": [{"name": v.name, "shape": list(static_shape(v) or []), "dtype": _dtype_name(v)}
                    for v in model.graph.outputs],
        "caches": [{"name": c.name, "source": c.source, "shape": c.shape, "dtype": c.dtype, "kind": c.kind,
                    **({"resolution": c.resolution} if c.resolution else {})} for c in caches],
        "resolutions": resolutions,
        "mask_program": ctx.masks.program(threshold, dilation),
        "updates": updates,
        "approximations": ctx.approximations,
        "nodes": [r.to_json() for r in ctx.reports],
        "batch": batch,
    }
    return RewriteResult(full=full, sparse=sparse, dense=dense, manifest=manifest)


def _remove_dead_nodes(model: onnx.ModelProto, keep_inputs: set[str]) -> onnx.ModelProto:
    """Drop SPARSE-graph nodes, inputs and initializers no output depends on (unused gathers, views)."""
    needed = {o.name for o in model.graph.output}
    keep = []
    for node in reversed(model.graph.node):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    del model.graph.node[:]
    model.graph.node.extend(reversed(keep))
    inputs = [i for i in model.graph.input if i.name in needed or i.name in keep_inputs]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    inits = [t for t in model.graph.initializer if t.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model
