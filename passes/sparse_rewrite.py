"""The sparse rewrite: from a canonical model to the FULL, SPARSE and DENSE graphs of an engine.

:func:`rewrite` validates the options and runs onnx-ir passes over the canonical model (which
none of them modifies):

1. :class:`~sigec.passes.build_sparse_graph.BuildSparseGraphPass` builds the SPARSE graph; its
   docstring and ``DECISIONS`` table state, in order, how each node is rewritten;
2. onnx-ir's ``RemoveUnusedNodesPass``, then
   :class:`~sigec.passes.remove_unused_inputs.RemoveUnusedInputsPass` prune what no output reads
   (gathers fused away, nodes of declined rules, their caches and tile indices);
3. :class:`~sigec.passes.cache_update_outputs.AddCacheUpdateOutputsPass` outputs the recomputed
   tiles of every activation cache;
4. :class:`~sigec.passes.build_full_graph.BuildFullGraphPass` builds FULL (the model plus the
   caches the pruned SPARSE graph reads, and frozen normalisation statistics);
5. :func:`~sigec.passes.sparse_manifest.build_manifest` describes the graphs;
6. passes/half_caches.py (``cache_dtype`` "float16" / "bfloat16"): the caches that only TileGather
   and TileScatter read are stored in half precision (SPARSE inputs retyped, FULL outputs cast,
   manifest entries updated).

DENSE is the canonical model itself. The graphs leave as ``onnx.ModelProto`` without initializers
(passes/weightless.py: no 2 GiB protobuf limit), their weights once, by name, beside them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import onnx
import onnx_ir as ir

from sigec.core.errors import CompileError
from sigec.core.options import (DEFAULT_APPROX_DILATION, DEFAULT_CACHE_DTYPE, DEFAULT_NORM_STATS, DEFAULT_TILE_SIZE,
                                FALLBACKS, MODES, NORM_STATS)
from sigec.passes.build_full_graph import BuildFullGraphPass
from sigec.passes.build_sparse_graph import BuildSparseGraphPass
from sigec.passes.cache_update_outputs import AddCacheUpdateOutputsPass
from sigec.passes.half_caches import (CastFullCachesPass, HalfCacheInputsPass, check_cache_dtype, choose_half_caches,
                                      half_cache_manifest)
from sigec.passes.remove_unused_inputs import RemoveUnusedInputsPass
from sigec.passes.sparse_context import RewriteContext, RewriteOptions, SpatialInputs
from sigec.passes.sparse_manifest import build_manifest
from sigec.passes.weightless import weightless_proto


@dataclass
class RewriteResult:
    """The graphs (without initializers), the weights they read, and the manifest fields describing them."""

    full: onnx.ModelProto
    sparse: onnx.ModelProto
    dense: onnx.ModelProto
    manifest: dict[str, Any]
    weights: dict[str, np.ndarray]

    @property
    def graphs(self) -> dict[str, onnx.ModelProto]:
        """The engine's graphs by role."""
        return {"full": self.full, "sparse": self.sparse, "dense": self.dense}


def _same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and (np.shares_memory(a, b) or np.array_equal(a, b))


def _serialize(models: Mapping[str, ir.Model]) -> tuple[dict[str, onnx.ModelProto], dict[str, np.ndarray]]:
    """Every model as a protobuf without initializers, and one copy of each weight by name."""
    protos: dict[str, onnx.ModelProto] = {}
    weights: dict[str, np.ndarray] = {}
    for role, model in models.items():
        protos[role], arrays = weightless_proto(model)
        for name, array in arrays.items():
            if name in weights and not _same_array(weights[name], array):
                raise CompileError(f"internal: weight {name!r} of the {role.upper()} graph differs from the one of "
                                   f"the same name in another graph")
            weights.setdefault(name, array)
    return protos, weights


def _options(mode: str, tile_size: int | Mapping[str, int], fallback: str,
             dense_resolutions: tuple[str, ...], norm_stats: str) -> RewriteOptions:
    if norm_stats not in NORM_STATS:
        raise CompileError(f"norm_stats must be one of {', '.join(NORM_STATS)}, not {norm_stats!r}")
    if dense_resolutions and mode != "approx":
        raise CompileError("dense_resolutions needs mode='approx' (in exact mode everything downstream of a "
                           "dense map would run dense)")
    for name in dense_resolutions:
        if not re.fullmatch(r"r\d+x\d+", str(name)):
            raise CompileError(f"dense resolution {name!r} is not a resolution name like 'r16x16'")
    return RewriteOptions(mode, tile_size, fallback, frozenset(dense_resolutions), norm_stats)


def rewrite(model: ir.Model, *, mode: str = "approx", tile_size: int | dict[str, int] = DEFAULT_TILE_SIZE,
            fallback: str = "error", threshold: float = 0.0, dilation: int = 0, approx_dilation: int = DEFAULT_APPROX_DILATION,
            dense_resolutions: tuple[str, ...] = (), cache_dtype: str | None = None,
            norm_stats: str | None = None) -> RewriteResult:
    """Rewrite a canonical model into FULL, SPARSE and DENSE graphs plus manifest fields.

    ``tile_size`` is one size or a mapping from resolution names (``"r64x64"``) and ``"default"``
    to sizes (unnamed resolutions: ``default``, else DEFAULT_TILE_SIZE). ``dense_resolutions``
    (approx mode): resolution names such as ``"r8x8"`` whose nodes run dense. ``threshold``,
    ``dilation`` and ``approx_dilation`` go into the mask program. ``cache_dtype`` ("float32",
    "float16" or "bfloat16"; None: DEFAULT_CACHE_DTYPE of the mode) is the precision of the caches
    only TileGather/TileScatter read (passes/half_caches.py); the manifest's
    ``options.cache_dtype`` records it.
    ``norm_stats`` (approx mode; None: DEFAULT_NORM_STATS): GroupNorm / InstanceNorm statistics
    "frozen" from the original or "updated" from the active tiles (passes/norm_stats.py).
    """
    if mode not in MODES:
        raise CompileError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if fallback not in FALLBACKS:
        raise CompileError(f"fallback must be one of {', '.join(FALLBACKS)}, not {fallback!r}")
    cache_dtype = check_cache_dtype(DEFAULT_CACHE_DTYPE[mode] if cache_dtype is None else cache_dtype)
    spatial = SpatialInputs.of(model)
    ctx = RewriteContext.create(model, _options(mode, tile_size, fallback, tuple(dense_resolutions),
                                                 DEFAULT_NORM_STATS if norm_stats is None else norm_stats), spatial)
    sparse = BuildSparseGraphPass(ctx)(model).model
    sparse = ir.passes.Sequential(
        ir.passes.common.RemoveUnusedNodesPass(),
        RemoveUnusedInputsPass(keep=[v.name for v in spatial.values]),  # type: ignore[misc]
        AddCacheUpdateOutputsPass(ctx),
    )(sparse).model
    caches = ctx.caches.read_by(sparse.graph)
    full = BuildFullGraphPass(caches, ctx.caches.stats, ctx.batch)(model).model
    manifest = build_manifest(ctx, model, sparse.graph, caches, threshold=threshold, dilation=dilation,
                              approx_dilation=approx_dilation)
    half = choose_half_caches(sparse.graph, caches, cache_dtype)
    if half.chosen:
        sparse = HalfCacheInputsPass(half)(sparse).model
        full = CastFullCachesPass(half, [v.name for v in model.graph.outputs])(full).model
        manifest = half_cache_manifest(manifest, half)
    manifest = {**manifest, "options": {**manifest.get("options", {}), "cache_dtype": cache_dtype}}
    protos, weights = _serialize({"full": full, "sparse": sparse, "dense": model})
    return RewriteResult(full=protos["full"], sparse=protos["sparse"], dense=protos["dense"], manifest=manifest,
                         weights=weights)
