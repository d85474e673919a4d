"""The manifest fields that describe a rewrite's graphs (the schema: sigec/core/manifest_schema.py)."""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir

from sigec.core.names import coords_input, grid_input
from sigec.passes._ir_utils import static_shape
from sigec.passes.sparse_context import CacheSpec, RewriteContext, dtype_of


def _dtype_name(value: ir.Value) -> str:
    return onnx.helper.tensor_dtype_to_np_dtype(dtype_of(value).value).name


def _resolutions(ctx: RewriteContext, sparse: ir.Graph, approx_dilation: int) -> list[dict[str, Any]]:
    """The resolutions whose tile index the SPARSE graph reads, each with the mask of its tiles."""
    inputs = {v.name for v in sparse.inputs}
    found = []
    for res in ctx.grids.resolutions.values():
        if coords_input(res.name) not in inputs and grid_input(res.name) not in inputs:
            continue
        mask = ctx.masks.resolution_mask(res.size, ctx.grids.tensor_masks[res.name], approx_dilation)
        found.append({"name": res.name, "size": res.size, "tile": res.tile, "mask": mask.id,
                      **({"shared_batch": True} if res.name in ctx.grids.shared_batch else {})})
    return found


def build_manifest(ctx: RewriteContext, model: ir.Model, sparse: ir.Graph, caches: list[CacheSpec], *,
                   threshold: float, dilation: int, approx_dilation: int) -> dict[str, Any]:
    """Manifest fields for the canonical ``model`` and the pruned ``sparse`` graph reading ``caches``.

    Computing the resolutions' masks completes the mask program, so it is written last.
    """
    resolutions = _resolutions(ctx, sparse, approx_dilation)
    approximations = list(ctx.record.approximations)
    if not ctx.exact and resolutions:
        approximations.insert(0, {
            "node": "*", "op_type": "mask",
            "detail": f"SIGE-style masks: each resolution's tiles are the edit resampled and dilated by "
                      f"{approx_dilation} px; changes that convolutions spread further are not recomputed"})
    return {
        "mode": ctx.options.mode,
        "inputs": [{"name": v.name, "shape": list(static_shape(v) or []), "dtype": _dtype_name(v),
                    "spatial": v in ctx.spatial.values} for v in model.graph.inputs],
        "outputs": [{"name": v.name, "shape": list(static_shape(v) or []), "dtype": _dtype_name(v)}
                    for v in model.graph.outputs],
        "caches": [c.to_json() for c in caches],
        "resolutions": resolutions,
        "mask_program": ctx.masks.program(threshold, dilation),
        "updates": ctx.record.updates,
        "approximations": approximations,
        "nodes": [r.to_json() for r in ctx.record.reports],
        "batch": ctx.batch,
    }
