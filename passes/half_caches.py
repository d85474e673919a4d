"""Half-precision caches (``cache_dtype`` "float16" / "bfloat16"): a post-pass of the sparse rewrite.

A key's caches are most of an engine's memory (every activation a sparse region reads, per primed
key). The caches that only sigec's tile operators read can be stored in half precision: TileGather
and TileScatter read a float16/bfloat16 ``base`` and widen it exactly to float32 when their tiles
(``vals``) are float32 (docs/ops.md, "Dtypes"), so the rest of the SPARSE graph is unchanged. Caches
read by a standard ONNX op (static tensors, frozen statistics, token caches scattered with
ScatterND, ...) stay as they are.

Run by :func:`sigec.passes.sparse_rewrite.rewrite` after the other passes:

1. :func:`choose_half_caches` picks the caches (rules in its docstring);
2. :class:`HalfCacheInputsPass` retypes their SPARSE graph inputs;
3. :class:`CastFullCachesPass` makes the FULL graph output each of them through a ``Cast`` (so
   ``Engine.prime`` stores half arrays; nothing is converted at run time);
4. :func:`half_cache_manifest` updates their manifest entries (``dtype``, ``source`` = the Cast
   output, ``origin`` = the model tensor) and records ``options.cache_dtype``.

Tile updates (``run(update_cache=True)``) stay float32 SPARSE outputs; the engine casts them to the
cache's dtype when it writes them (runtime/cache_store.py, ``cast_tiles``).

:func:`recast_caches` changes the choice of a compiled engine (``sigec.load(..., cache_dtype=...)``):
it undoes the half caches (:class:`UncastFullCachesPass`, SPARSE inputs back to float32, the manifest
entries as they were) and applies steps 1-4 for the new dtype, so an engine loaded with a dtype has
the graphs and manifest that compiling with it gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import onnx_ir as ir

from sigec.core.errors import CompileError, EngineFileError
from sigec.core.ops import DOMAIN
from sigec.core.options import CACHE_DTYPES
from sigec.passes.graph_builder import GraphBuilder
from sigec.passes.sparse_context import CacheSpec

HALF_DTYPES: dict[str, ir.DataType] = {"float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
IR_DTYPES: dict[str, ir.DataType] = {"float32": ir.DataType.FLOAT, **HALF_DTYPES}
TILE_OPS = ("TileGather", "TileScatter")


def check_cache_dtype(cache_dtype: str) -> str:
    """``cache_dtype`` if it is one of CACHE_DTYPES, else a CompileError."""
    if cache_dtype not in CACHE_DTYPES:
        raise CompileError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, not {cache_dtype!r}")
    return cache_dtype


@dataclass
class HalfCaches:
    """The outcome of the choice: the caches stored in ``dtype`` (input name -> the model tensor they
    hold) and why each other cache stays in its dtype (input name -> reason)."""

    dtype: str
    chosen: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    full_outputs: dict[str, str] = field(default_factory=dict)  # input name -> FULL output (set by CastFullCachesPass)


def _why_not(value: ir.Value) -> str | None:
    """Why the SPARSE input ``value`` cannot be stored in half precision (None: it can)."""
    if value.dtype != ir.DataType.FLOAT:
        return f"its dtype is {value.dtype}, not float32"
    if value.is_graph_output():
        return "it is a graph output"
    uses = list(value.uses())
    if not uses:
        return "nothing reads it"
    for use in uses:
        node, index = use.node, use.idx
        where = f"{node.domain + '::' if node.domain else ''}{node.op_type} node '{node.name}'"
        if node.domain != DOMAIN or node.op_type not in TILE_OPS:
            return f"{where} reads it"
        if index != 0:
            return f"{where} reads it as input {index}, not as its base"
        if node.op_type == "TileScatter" and node.outputs[0].is_graph_output():
            return f"{where} makes a model output from it (pixels outside the edit must equal the primed output)"
        vals = node.inputs[1] if len(node.inputs) > 1 else None
        if vals is None:
            return f"{where} reads it without tiles (its output would be half)"
        if vals.dtype != ir.DataType.FLOAT:
            return f"{where} reads it with {vals.dtype} tiles"
    return None


def choose_half_caches(sparse: ir.Graph, caches: Sequence[CacheSpec], cache_dtype: str) -> HalfCaches:
    """The caches of the pruned ``sparse`` graph stored in ``cache_dtype``.

    Rules (``cache_dtype`` "float32" chooses none):
    1. The cache's SPARSE input is float32 and not a graph output.
    2. Every use of it is input 0 (``base``) of an ``ai.sigec`` TileGather or TileScatter, so no
       standard ONNX op ever reads it (those would need float32).
    3. Each of those nodes has float32 ``vals`` (input 1): its output, ``base``'s dtype promoted
       with ``vals``', is then float32, as the rest of the graph expects.
    4. No TileScatter reading it is a model output: a run's output outside the edit is the cached
       one and must equal the primed output bit for bit (chained engines and automatic masks
       compare them), not its half rounding.
    Every other cache stays as it is, with the reason recorded.
    """
    result = HalfCaches(check_cache_dtype(cache_dtype))
    if cache_dtype not in HALF_DTYPES:
        return result
    inputs = {v.name: v for v in sparse.inputs}
    for cache in caches:
        value = inputs.get(cache.name)
        reason = "the SPARSE graph does not read it" if value is None else _why_not(value)
        if reason is None:
            result.chosen[cache.name] = cache.source
        else:
            result.kept[cache.name] = reason
    return result


class HalfCacheInputsPass(ir.passes.InPlacePass):
    """Retype the SPARSE graph inputs of the chosen caches to ``choice.dtype`` (a half dtype; float32
    when :func:`recast_caches` undoes them).

    Nothing else in SPARSE changes: the tile operators reading them keep float32 outputs.
    """

    def __init__(self, choice: HalfCaches) -> None:
        super().__init__()
        self.choice = choice

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for value in model.graph.inputs:
            if value.name in self.choice.chosen:
                value.dtype = IR_DTYPES[self.choice.dtype]
                modified = True
        return ir.passes.PassResult(model, modified)


class CastFullCachesPass(ir.passes.InPlacePass):
    """Output each chosen cache from FULL through a ``Cast`` to the half dtype.

    Rules:
    1. The Cast reads the cache's source tensor (a node output or a model input) and is appended at
       the end of the graph; its output is named ``<source>::<dtype>`` (made unique).
    2. The Cast output takes the place of the source in FULL's outputs when BuildFullGraphPass had
       added the source for the cache; a source that is a model output (or input) stays as it is and
       the Cast output is appended.
    Sets ``choice.full_outputs``.
    """

    def __init__(self, choice: HalfCaches, model_outputs: Iterable[str]) -> None:
        super().__init__()
        self.choice = choice
        self.model_outputs = frozenset(model_outputs)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        values = {v.name: v for v in graph.inputs}
        values.update({out.name: out for node in graph for out in node.outputs})
        builder = GraphBuilder(graph, reserved_names=[*values, *graph.initializers])
        positions = {v.name: i for i, v in enumerate(graph.outputs)}
        dtype = HALF_DTYPES[self.choice.dtype]
        for name, source in self.choice.chosen.items():
            value = values.get(source)
            if value is None:
                raise CompileError(f"internal: cache '{name}' reads '{source}', which the FULL graph lacks")
            cast = builder.op("Cast", [value], hint=f"{source}::{self.choice.dtype}", to=int(dtype))
            cast.dtype = dtype
            cast.shape = value.shape
            if source in positions and source not in self.model_outputs and not value.is_graph_input():
                graph.outputs[positions[source]] = cast
            else:
                graph.outputs.append(cast)
            self.choice.full_outputs[name] = cast.name
        return ir.passes.PassResult(model, bool(self.choice.chosen))


def half_cache_manifest(manifest: Mapping[str, Any], choice: HalfCaches) -> dict[str, Any]:
    """The manifest with the chosen caches described as stored: ``dtype`` the half dtype, ``source``
    the FULL output holding them (what ``Engine.prime`` reads), ``origin`` the model tensor cached."""
    caches = []
    for entry in manifest["caches"]:
        name = entry["name"]
        if name in choice.chosen:
            entry = {**entry, "dtype": choice.dtype, "source": choice.full_outputs[name], "origin": entry["source"]}
        caches.append(entry)
    return {**manifest, "caches": caches}


class UncastFullCachesPass(ir.passes.InPlacePass):
    """Undo CastFullCachesPass: FULL outputs the model tensors of the half caches in float32 again.

    ``casts``: the Cast outputs to undo (the manifest's ``source`` of each half cache).
    Rules:
    1. A Cast output among FULL's outputs is replaced by the Cast's input in place, unless that input
       is a graph input or output already (CastFullCachesPass had appended the Cast output): then it
       is removed.
    2. The Cast node is removed when nothing else reads its output.
    An output that is no ``Cast`` of FULL is an EngineFileError (the manifest does not describe the graph).
    """

    def __init__(self, casts: Iterable[str]) -> None:
        super().__init__()
        self.casts = frozenset(casts)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.outputs[0].name: node for node in graph if node.op_type == "Cast" and not node.domain}
        missing = sorted(self.casts - set(nodes))
        if missing:
            raise EngineFileError(f"the FULL graph has no Cast producing the half caches {missing}")
        for name in self.casts:
            node = nodes[name]
            cast, source = node.outputs[0], node.inputs[0]
            assert source is not None
            position = next((i for i, v in enumerate(graph.outputs) if v is cast), None)
            if position is not None:
                if source.is_graph_input() or source.is_graph_output():
                    del graph.outputs[position]
                else:
                    graph.outputs[position] = source
            if not cast.uses() and not cast.is_graph_output():
                graph.remove(node, safe=True)
        return ir.passes.PassResult(model, bool(self.casts))


def float32_cache_manifest(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest with its half caches described as float32 caches of their model tensors (the
    inverse of :func:`half_cache_manifest`)."""
    caches = []
    for entry in manifest["caches"]:
        if "origin" in entry:
            entry = {**{k: v for k, v in entry.items() if k != "origin"}, "dtype": "float32", "source": entry["origin"]}
        caches.append(entry)
    return {**manifest, "caches": caches}


def store_caches(full: ir.Model, sparse: ir.Model, manifest: Mapping[str, Any], caches: Sequence[CacheSpec],
                 cache_dtype: str, model_outputs: Iterable[str]) -> dict[str, Any]:
    """Steps 1-4 on graphs whose caches are all float32 (``full`` and ``sparse`` changed in place):
    return the manifest, ``options.cache_dtype`` included."""
    half = choose_half_caches(sparse.graph, caches, cache_dtype)
    if half.chosen:
        HalfCacheInputsPass(half)(sparse)
        CastFullCachesPass(half, model_outputs)(full)
        manifest = half_cache_manifest(manifest, half)
    return {**manifest, "options": {**manifest.get("options", {}), "cache_dtype": cache_dtype}}


def recast_caches(full: ir.Model, sparse: ir.Model, manifest: Mapping[str, Any], cache_dtype: str) -> dict[str, Any]:
    """A compiled engine's FULL and SPARSE graphs (changed in place) and manifest (returned) with the
    caches stored as compiling with ``cache_dtype`` stores them.

    Its half caches (manifest entries with an ``origin``) become float32 again (FULL outputs their
    model tensors, SPARSE reads float32), then :func:`store_caches` chooses for ``cache_dtype``. Exact:
    the graphs run the same operators as the compiler's, so outputs equal those of an engine compiled
    with ``cache_dtype``.
    """
    check_cache_dtype(cache_dtype)
    half = {c["name"]: c for c in manifest["caches"] if "origin" in c}
    if half:
        UncastFullCachesPass(c["source"] for c in half.values())(full)
        HalfCacheInputsPass(HalfCaches("float32", chosen={n: c["origin"] for n, c in half.items()}))(sparse)
        manifest = float32_cache_manifest(manifest)
    specs = [CacheSpec(c["name"], c["source"], list(c["shape"]), c["dtype"], c["kind"], c.get("resolution"))
             for c in manifest["caches"]]
    return store_caches(full, sparse, manifest, specs, cache_dtype, [o["name"] for o in manifest["outputs"]])
