"""The FULL graph: the canonical model plus an output for every cache the SPARSE graph reads."""

from __future__ import annotations

from typing import Sequence

import onnx_ir as ir

from sigec.passes.graph_builder import GraphBuilder
from sigec.passes.sparse_context import CacheSpec, StatsRequest
from sigec.passes.stats_graph import add_norm_moments, add_norm_statistics


class BuildFullGraphPass(ir.passes.FunctionalPass):
    """Build FULL from the canonical model (a clone; tensors are shared, the model is not modified).

    ``Engine.prime`` runs FULL and keeps its outputs as the caches of the SPARSE graph.

    Rules:
    1. An activation or static cache whose source is a model input or already an output adds
       nothing (the runtime fills input caches from the primed inputs).
    2. Any other activation or static cache's source becomes an output, in ``caches`` order.
    3. Frozen statistics (a ``stats`` cache): nodes computing the per-channel scale and shift are
       appended (passes/stats_graph.py), once per normalised tensor, their results outputs.
    4. Updated statistics (``stats`` caches too): nodes computing the per-group mean and variance,
       the same way (once per normalised tensor).
    """

    def __init__(self, caches: Sequence[CacheSpec], stats: Sequence[StatsRequest], batch: int) -> None:
        super().__init__()
        self.caches = list(caches)
        self.stats = list(stats)
        self.batch = batch

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        full = model.clone()
        graph = full.graph
        values = {v.name: v for v in graph.inputs}
        values.update({out.name: out for node in graph for out in node.outputs})
        modified = False
        for cache in self.caches:
            value = values.get(cache.source)
            if cache.kind == "stats" or value is None or value.is_graph_input() or value.is_graph_output():
                continue
            graph.outputs.append(value)
            modified = True
        builder = GraphBuilder(graph, reserved_names=[*values, *graph.initializers], const_prefix="full::")
        read = {c.name for c in self.caches}
        done: set[tuple[str, str]] = set()
        add = {"affine": add_norm_statistics, "moments": add_norm_moments}
        for request in self.stats:
            if (request.x, request.kind) in done or not read.intersection(request.caches):
                continue
            done.add((request.x, request.kind))
            add[request.kind](builder, request, values[request.x], self.batch, graph.opset_imports.get("", 18))
            modified = True
        return ir.passes.PassResult(full, modified)
