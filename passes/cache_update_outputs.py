"""Outputs of the SPARSE graph with the recomputed tiles of every activation cache it reads."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sigec.passes.sparse_context import RewriteContext
from sigec.passes.sparse_forms import Dense, Tokens


class AddCacheUpdateOutputsPass(ir.passes.InPlacePass):
    """Add, for every activation cache the SPARSE graph reads, its recomputed tiles as an output.

    ``Engine.run(update_cache=True)`` writes these tiles into the caches. The pass sets
    ``ctx.record.updates`` (the manifest's ``updates``: output, cache, resolution).

    Rules:
    1. The output is the tiles value of the cache source's Sparse form itself (no copy), typed
       ``[n_<res>, C, T, T]`` with the cache's dtype.
    2. Tiles that are already a graph output are not added again (so the pass is idempotent).
    3. Static and frozen-statistics caches get no output (the edit does not change them).
    4. A token cache (read only by a token scatter, passes/token_graph.py) gets the scattered full
       tensor as its output, marked ``whole``: the runtime replaces the cache with it. So does an
       activation cache whose source is Dense in the SPARSE graph (an incrementally updated global
       reduction, passes/global_rules.py): its new value is that Dense value. So does a cache whose new
       value the SPARSE graph computes (``CacheRegistry.recomputed``: the per-group moments of updated
       normalisation statistics, passes/norm_stats.py).
    """

    def __init__(self, ctx: RewriteContext) -> None:
        super().__init__()
        self.ctx = ctx

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        forms = {form.source: form for form in self.ctx.forms.sparse()}
        tokens = {form.source: form for form in self.ctx.forms.all() if isinstance(form, Tokens)}
        updates = []
        modified = False
        for cache in self.ctx.caches.read_by(graph):
            if cache.kind == "activation" and cache.source in tokens:
                full = self.ctx.scattered(cache.source)
                if not full.is_graph_output():
                    full.dtype = ir.DataType.from_numpy(np.dtype(cache.dtype))
                    full.shape = ir.Shape(cache.shape)
                    graph.outputs.append(full)
                    modified = True
                updates.append({"output": full.name, "cache": cache.name,
                                "resolution": tokens[cache.source].res.name, "whole": True})
                continue
            dense = self.ctx.caches.recomputed.get(cache.name)
            if dense is None and cache.kind == "activation":
                dense = self._dense_value(cache.source)
            if dense is not None:
                if not dense.is_graph_output():
                    dense.dtype = ir.DataType.from_numpy(np.dtype(cache.dtype))
                    dense.shape = ir.Shape(cache.shape)
                    graph.outputs.append(dense)
                    modified = True
                updates.append({"output": dense.name, "cache": cache.name, "resolution": cache.resolution or "",
                                "whole": True})
                continue
            if cache.kind != "activation" or cache.source not in forms:
                continue
            form = forms[cache.source]
            if not form.vals.is_graph_output():
                form.vals.dtype = ir.DataType.from_numpy(np.dtype(cache.dtype))
                form.vals.shape = ir.Shape([f"n_{form.res.name}", cache.shape[1], form.res.tile, form.res.tile])
                graph.outputs.append(form.vals)
                modified = True
            updates.append({"output": form.vals.name, "cache": cache.name, "resolution": form.res.name})
        self.ctx.record.updates = updates
        return ir.passes.PassResult(model, modified)

    def _dense_value(self, source: str) -> ir.Value | None:
        """The SPARSE value of an original tensor whose form is Dense (None for other forms)."""
        value = self.ctx.forms.value_by_name(source)
        if not self.ctx.forms.has(value):
            return None
        form = self.ctx.forms.get(value)
        if not isinstance(form, Dense) or form.value.is_graph_input():
            return None  # model inputs: the runtime refreshes their caches from the new inputs
        return form.value
