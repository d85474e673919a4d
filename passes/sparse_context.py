"""State of one sparse rewrite, one class per job, and the conversions between forms the rules use.

- :class:`ValueForms`: the form of every original value in the SPARSE graph;
- :class:`TileGrids`: resolutions, their engine-fed tile index inputs, their tensors' masks;
- :class:`CacheRegistry`: the tensors the FULL graph computes for the SPARSE graph;
- :class:`RewriteRecord`: per-node reports and approximations (manifest);
- :class:`~sigec.passes.graph_builder.GraphBuilder`: emission into the SPARSE graph;
- :class:`~sigec.passes.mask_builder.MaskProgramBuilder`: the mask program.

:class:`RewriteContext` holds one of each and converts between forms (gather, scatter, broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from sigec.core.errors import CompileError
from sigec.core.names import cache_input, coords_input, grid_input
from sigec.core.options import DEFAULT_NORM_STATS, DEFAULT_TILE_SIZE
from sigec.passes._ir_utils import static_shape
from sigec.passes.graph_builder import SIGEC_DOMAIN, GraphBuilder, sparse_graph
from sigec.passes.group_norm_match import NormMatch
from sigec.passes.mask_builder import MaskProgramBuilder
from sigec.passes.sparse_forms import (EMPTY_MASK, Dense, Form, GatherSource, MaskId, Padded, Prologue, Resolution,
                                       Sparse, Tokens, View)
from sigec.passes.token_graph import TokenIndex, build_token_index, scatter_items, scatter_tokens
from sigec.passes.token_layout import TokenLayout


class Unsupported(Exception):
    """Raised by a rule when a node cannot be rewritten sparsely (reason in the message)."""


@dataclass(frozen=True)
class RewriteOptions:
    """The compile options the rewrite itself uses (validated by the driver)."""

    mode: str
    tile_size: int | Mapping[str, int]
    fallback: str
    dense_resolutions: frozenset[str] = frozenset()
    norm_stats: str = DEFAULT_NORM_STATS  # approx mode: "frozen" or "updated" normalisation statistics

    @property
    def exact(self) -> bool:
        """True in exact mode."""
        return self.mode == "exact"

    def tile_for(self, resolution: str) -> int:
        """The tile size of a resolution: a mapping names it or its ``default`` (else DEFAULT_TILE_SIZE)."""
        if isinstance(self.tile_size, Mapping):
            return int(self.tile_size.get(resolution, self.tile_size.get("default", DEFAULT_TILE_SIZE)))
        return int(self.tile_size)


@dataclass(frozen=True)
class SpatialInputs:
    """The model's edited inputs: float ``[B, C, H, W]`` tensors sharing one size."""

    values: tuple[ir.Value, ...]
    batch: int
    size: tuple[int, int]

    @classmethod
    def of(cls, model: ir.Model) -> SpatialInputs:
        """Find them; CompileError when there are none or their sizes differ."""
        spatial: list[ir.Value] = []
        batch, size = 0, (0, 0)
        for value in model.graph.inputs:
            s = static_shape(value)
            if s is None or len(s) != 4 or s[2] * s[3] <= 1 or value.dtype not in (ir.DataType.FLOAT,
                                                                                   ir.DataType.FLOAT16):
                continue
            if spatial and (s[2], s[3]) != size:
                raise CompileError(f"spatial inputs must share one size: '{value.name}' is {s[2]}x{s[3]}, "
                                   f"'{spatial[0].name}' is {size[0]}x{size[1]}")
            spatial.append(value)
            batch, size = int(s[0]), (int(s[2]), int(s[3]))
        if not spatial:
            names = ", ".join(f"'{v.name}' {static_shape(v)}" for v in model.graph.inputs)
            raise CompileError(f"the model has no spatial input (a float [B, C, H, W] tensor); inputs: {names}")
        return cls(tuple(spatial), batch, size)


@dataclass
class CacheSpec:
    """A tensor the FULL graph produces for the SPARSE graph (``kind``: activation, static, stats)."""

    name: str
    source: str
    shape: list[int]
    dtype: str
    kind: str
    resolution: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The manifest entry."""
        return {"name": self.name, "source": self.source, "shape": self.shape, "dtype": self.dtype, "kind": self.kind,
                **({"resolution": self.resolution} if self.resolution else {})}


@dataclass
class NodeReport:
    """What the rewrite did with one node of the original model (for ``sigec inspect``)."""

    name: str
    op_type: str
    kind: str  # sparse | dense | static | constant | approx
    resolution: str | None = None
    tile: int | None = None
    window: list[int] | None = None
    dense_macs: int = 0
    macs_per_tile: int = 0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {k: v for k, v in self.__dict__.items() if v not in (None, "")}


@dataclass(frozen=True)
class StatsRequest:
    """Normalisation statistics of ``x`` the FULL graph must produce as the caches ``caches``.

    ``kind`` "affine" (frozen statistics): the per-channel scale and shift [B, C]; "moments" (updated
    statistics, passes/norm_stats.py): the per-group mean and variance [B, G, 1].
    """

    x: str
    caches: tuple[str, str]
    match: NormMatch
    kind: str = "affine"


def shape_of(value: ir.Value) -> tuple[int, ...]:
    """Static shape of an original value (CompileError when it has none)."""
    s = static_shape(value)
    if s is None:
        raise CompileError(f"value '{value.name}' has no static shape")
    return s


def dtype_of(value: ir.Value) -> ir.DataType:
    """Element type of an original value (float when unknown)."""
    return value.dtype if value.dtype is not None else ir.DataType.FLOAT


class ValueForms:
    """The form of every original value in the SPARSE graph, by the value's name."""

    def __init__(self, model: ir.Model, graph: GraphBuilder) -> None:
        self._graph = graph
        self._forms: dict[str, Form] = {}
        self._values = {v.name: v for v in model.graph.inputs}
        self._values.update({out.name: out for node in model.graph for out in node.outputs})

    def get(self, value: ir.Value) -> Form:
        """The form of an original value (initializers become Dense constants on first use)."""
        if value.name in self._forms:
            return self._forms[value.name]
        if value.const_value is not None:
            return Dense(self._graph.initializer(value), EMPTY_MASK)
        raise CompileError(f"internal: value '{value.name}' has no form (not topologically sorted?)")

    def set(self, value: ir.Value, form: Form) -> None:
        """Record the form of an original value."""
        self._forms[value.name] = form  # type: ignore[index]

    def has(self, value: ir.Value) -> bool:
        """True once the value has a form."""
        return value.name in self._forms

    def is_edit_dependent(self, value: ir.Value | None) -> bool:
        """True when the value may change with the edit (any form but a Dense one with an empty mask)."""
        if value is None or value.name not in self._forms:
            return False
        f = self._forms[value.name]
        return not (isinstance(f, Dense) and f.mask == EMPTY_MASK)

    def value_by_name(self, name: str) -> ir.Value:
        """The original model's value called ``name``."""
        return self._values[name]

    def all(self) -> Iterator[Form]:
        """Every form, in the order the values got them."""
        return iter(self._forms.values())

    def sparse(self) -> Iterator[Sparse]:
        """Every Sparse form, in the order the values got them."""
        return (f for f in self._forms.values() if isinstance(f, Sparse))


class TileGrids:
    """The tile grid of every resolution, its engine-fed tile index inputs and its tensors' masks."""

    def __init__(self, graph: GraphBuilder, options: RewriteOptions, batch: int) -> None:
        self._graph = graph
        self._options = options
        self.batch = batch
        self.resolutions: dict[tuple[int, int], Resolution] = {}
        self.tensor_masks: dict[str, list[MaskId | None]] = {}
        self._batch_index: dict[str, ir.Value] = {}
        self._token_index: dict[str, TokenIndex] = {}
        self.shared_batch: set[str] = set()  # resolutions whose batch items share one tile set

    def is_spatial(self, value: ir.Value) -> bool:
        """A feature map: 4-D, batch-sized, with more than one pixel."""
        s = static_shape(value)
        return s is not None and len(s) == 4 and s[0] == self.batch and s[2] * s[3] > 1

    def resolution(self, height: int, width: int) -> Resolution:
        """The tile grid for maps of ``height x width`` (created on first use)."""
        key = (height, width)
        if key not in self.resolutions:
            res = Resolution(height, width, self._options.tile_for(f"r{height}x{width}"))
            self.resolutions[key] = res
            self.tensor_masks[res.name] = []
        return self.resolutions[key]

    def res_of(self, value: ir.Value) -> Resolution:
        """The resolution of a spatial value."""
        s = shape_of(value)
        return self.resolution(s[2], s[3])

    def on_known_resolution(self, value: ir.Value) -> bool:
        """A feature map of a size some sparse tensor already has."""
        return self.is_spatial(value) and tuple(shape_of(value)[2:]) in self.resolutions

    def dense_resolution_of(self, node: ir.Node) -> str | None:
        """The resolution listed in ``dense_resolutions`` that one of the node's spatial outputs lies on."""
        for out in node.outputs:
            s = static_shape(out)
            if s is not None and self.is_spatial(out) and f"r{s[2]}x{s[3]}" in self._options.dense_resolutions:
                return f"r{s[2]}x{s[3]}"
        return None

    def note_mask(self, res: Resolution, mask: MaskId | None) -> None:
        """A sparse tensor of ``res`` may differ inside ``mask`` (exact mode unites them into the tiles)."""
        self.tensor_masks[res.name].append(mask)

    def coords(self, res: Resolution) -> ir.Value:
        """The coords input [N, 3] of a resolution."""
        return self._graph.input(coords_input(res.name), ir.DataType.INT64, [f"n_{res.name}", 3])

    def grid(self, res: Resolution) -> ir.Value:
        """The grid input [B, gh, gw] of a resolution."""
        return self._graph.input(grid_input(res.name), ir.DataType.INT64, [self.batch, *res.grid_shape])

    def batch_index(self, res: Resolution) -> ir.Value:
        """The [N] batch index of every active tile of a resolution."""
        if res.name not in self._batch_index:
            zero = self._graph.const(np.array(0, np.int64), "c:zero")
            self._batch_index[res.name] = self._graph.op("Gather", [self.coords(res), zero],
                                                         hint=f"batch_of_tiles::{res.name}", axis=1)
        return self._batch_index[res.name]


    def token_index(self, res: Resolution) -> TokenIndex:
        """The token index of ``res`` (built once); tokens need tiles that divide the map."""
        if res.height % res.tile or res.width % res.tile:
            raise Unsupported(f"tokens of {res.name} need its tile size {res.tile} to divide the map")
        if res.name not in self._token_index:
            self._token_index[res.name] = build_token_index(self._graph, self.coords(res), res)
        return self._token_index[res.name]


class CacheRegistry:
    """The tensors the FULL graph computes for the SPARSE graph (``cache::<source>`` inputs)."""

    def __init__(self, graph: GraphBuilder, forms: ValueForms) -> None:
        self._graph = graph
        self._forms = forms
        self.specs: dict[str, CacheSpec] = {}
        self.stats: list[StatsRequest] = []
        # caches whose new value the SPARSE graph computes whole (updated statistics), by cache name
        self.recomputed: dict[str, ir.Value] = {}
        self._inputs: dict[str, ir.Value] = {}

    def cache(self, source: str, kind: str = "activation", resolution: str | None = None) -> ir.Value:
        """The SPARSE-graph input holding the FULL graph's value ``source`` (registered once)."""
        name = cache_input(source)
        if name not in self.specs:
            value = self._forms.value_by_name(source)
            shape, dtype = list(shape_of(value)), dtype_of(value)
            self.specs[name] = CacheSpec(name, source, shape, onnx.helper.tensor_dtype_to_np_dtype(dtype.value).name,
                                         kind, resolution)
            self._inputs[name] = self._graph.input(name, dtype, shape)
        return self._inputs[name]

    def frozen_stats(self, match: NormMatch, batch: int, channels: int) -> tuple[ir.Value, ir.Value]:
        """Cache inputs with the per-channel scale and shift ([B, C]) the FULL graph computes for ``match``."""
        return self._stats(match, ("scale", "shift"), [batch, channels], "affine")

    def group_moments(self, match: NormMatch, batch: int, resolution: str) -> tuple[ir.Value, ir.Value]:
        """Cache inputs with the per-group mean and variance ([B, G, 1]) of ``match``'s input in the original
        (updated statistics; ``resolution``: the input's, whose active tiles change them, as a whole-cache
        update goes with a resolution); Unsupported when another normalisation of the same input has other
        groups."""
        shape = [batch, int(match.groups), 1]
        for part in ("mean", "var"):
            spec = self.specs.get(cache_input(f"stats::{part}::{match.x.name}"))
            if spec is not None and spec.shape != shape:
                raise Unsupported(f"'{match.x.name}' is normalised over {spec.shape[1]} and {shape[1]} groups")
        return self._stats(match, ("mean", "var"), shape, "moments", resolution)

    def _stats(self, match: NormMatch, parts: tuple[str, str], shape: list[int], kind: str,
               resolution: str | None = None) -> tuple[ir.Value, ir.Value]:
        x = match.x.name
        inputs = []
        for part in parts:
            name = cache_input(f"stats::{part}::{x}")
            if name not in self.specs:
                self.specs[name] = CacheSpec(name, f"stats::{part}::{x}", shape, "float32", "stats", resolution)
                self._inputs[name] = self._graph.input(name, ir.DataType.FLOAT, shape)
            inputs.append(self._inputs[name])
        self.stats.append(StatsRequest(x, (inputs[0].name, inputs[1].name), match, kind))  # type: ignore[arg-type]
        return inputs[0], inputs[1]

    def read_by(self, graph: ir.Graph) -> list[CacheSpec]:
        """The caches ``graph`` (the pruned SPARSE graph) still reads, in registration order."""
        names = {v.name for v in graph.inputs}
        return [spec for name, spec in self.specs.items() if name in names]


class RewriteRecord:
    """What the rewrite reports in the manifest: one NodeReport per original node, the approximations,
    and the SPARSE outputs that update caches (set by AddCacheUpdateOutputsPass)."""

    def __init__(self) -> None:
        self.reports: list[NodeReport] = []
        self.approximations: list[dict[str, Any]] = []
        self.updates: list[dict[str, Any]] = []

    def report(self, node: ir.Node, kind: str, **fields: Any) -> NodeReport:
        """Record the rewrite decision for a node."""
        rep = NodeReport(node.name, node.op_type, kind, **fields)  # type: ignore[arg-type]
        self.reports.append(rep)
        return rep

    def approximate(self, node: ir.Node, detail: str) -> None:
        """Record that the sparse result of ``node`` is an approximation."""
        self.approximations.append({"node": node.name, "op_type": node.op_type, "detail": detail})


@dataclass
class RewriteContext:
    """One rewrite's state (a component per job) and the conversions between forms."""

    options: RewriteOptions
    spatial: SpatialInputs
    graph: GraphBuilder
    forms: ValueForms
    grids: TileGrids
    caches: CacheRegistry
    record: RewriteRecord
    masks: MaskProgramBuilder
    _dense_of: dict[str, ir.Value] = field(default_factory=dict)
    _token_dense: dict[str, ir.Value] = field(default_factory=dict)  # by Tokens source

    @classmethod
    def create(cls, model: ir.Model, options: RewriteOptions, spatial: SpatialInputs) -> RewriteContext:
        """A fresh context whose SPARSE graph reserves every name of ``model`` (copied nodes keep theirs)."""
        reserved = [v.name for v in model.graph.inputs] + [v.name for n in model.graph for v in n.outputs]
        graph = GraphBuilder(sparse_graph(dict(model.opset_imports)), reserved_names=reserved)  # type: ignore[arg-type]
        forms = ValueForms(model, graph)
        return cls(options=options, spatial=spatial, graph=graph, forms=forms,
                   grids=TileGrids(graph, options, spatial.batch), caches=CacheRegistry(graph, forms),
                   record=RewriteRecord(), masks=MaskProgramBuilder(options.exact, spatial.size))

    @property
    def exact(self) -> bool:
        """True in exact mode."""
        return self.options.exact

    @property
    def batch(self) -> int:
        """The model's batch size."""
        return self.spatial.batch

    def set_sparse(self, value: ir.Value, vals: ir.Value, res: Resolution, mask: MaskId | None,
                   view: View | None = None) -> Sparse:
        """Record that the original ``value`` is now Sparse with the tiles ``vals``."""
        s = shape_of(value)
        if (s[2], s[3]) != (res.height, res.width):
            raise CompileError(f"internal: '{value.name}' is {s} but its tiles are on {res.name}")
        form = Sparse(value.name, vals, res, mask, view)  # type: ignore[arg-type]
        self.forms.set(value, form)
        self.grids.note_mask(res, mask)
        return form

    def set_tokens(self, value: ir.Value, vals: ir.Value, res: Resolution, mask: MaskId | None,
                   layout: TokenLayout, items: ir.Value | None = None) -> Tokens:
        """Record that the original ``value`` is now Tokens with the active tokens ``vals`` (and, when
        a batched-attention rule made them, the same tokens as ``items`` [B, *heads, M/B, n])."""
        if tuple(shape_of(value)) != layout.shape:
            raise CompileError(f"internal: '{value.name}' is {list(shape_of(value))} but its token layout is "
                               f"{list(layout.shape)}")
        form = Tokens(value.name, vals, res, mask, layout, items)  # type: ignore[arg-type]
        self.forms.set(value, form)
        self.grids.note_mask(res, mask)
        return form

    def gather_source(self, form: Form) -> GatherSource:
        """Resolve a virtual Pad and views: what a TileGather reading ``form`` reads and how."""
        pads, mode = (0, 0, 0, 0), "zeros"
        if isinstance(form, Padded):
            pads, mode = form.pads, form.mode
            form = form.inner
        if not (isinstance(form, Sparse) and form.view is not None):
            return GatherSource(form, None, 1, pads, mode)
        view = form.view
        inner = view.inner
        if isinstance(inner, Sparse) and inner.view is not None and view.prologue is None:
            # nearest(upsample) of a prologue view: the prologue commutes with the upsampling
            return GatherSource(inner.view.inner, inner.view.prologue, inner.view.upsample * view.upsample, pads,
                                mode)
        return GatherSource(inner, view.prologue, view.upsample, pads, mode)

    def tile_gather(self, form: Form, out_res: Resolution, *, window: Sequence[int], step: Sequence[int],
                    offset: Sequence[int], pad_mode: str = "zeros", upsample: int = 1,
                    prologue: Prologue | None = None, hint: str) -> ir.Value:
        """Emit a TileGather reading ``form`` for the active tiles of ``out_res``."""
        if isinstance(form, Sparse):
            base = self.caches.cache(form.source, resolution=form.res.name)
            vals, grid = form.vals, self.grids.grid(form.res)
        elif isinstance(form, Tokens):
            raise Unsupported("a token view is not a feature map")
        elif isinstance(form, Dense):
            base, vals, grid = form.value, None, None
        else:
            raise Unsupported("a padded tensor must feed a convolution or pooling directly")
        p = prologue or Prologue()
        inputs = [base, vals, grid, self.grids.coords(out_res), p.scale, p.shift]
        while inputs and inputs[-1] is None:
            inputs.pop()
        return self.graph.op("TileGather", inputs, hint=hint, domain=SIGEC_DOMAIN,
                             window=[int(w) for w in window], step=[int(s) for s in step],
                             offset=[int(o) for o in offset], upsample=int(upsample), pad_mode=pad_mode,
                             activation=p.activation, alpha=float(p.alpha), beta=float(p.beta))

    def to_sparse(self, value: ir.Value, res: Resolution, node: ir.Node) -> Sparse:
        """The value as tiles of ``res`` (gathering from a full tensor when it is Dense)."""
        form = self.forms.get(value)
        if isinstance(form, Sparse):
            if form.res != res:
                raise Unsupported(f"input '{value.name}' is on {form.res.name}, the node's output on {res.name}")
            return form
        if isinstance(form, Padded):
            raise Unsupported("a padded tensor must feed a convolution or pooling directly")
        if isinstance(form, Tokens):
            raise Unsupported(f"input '{value.name}' is a token view, not a feature map")
        s = shape_of(value)
        if (s[2], s[3]) != (res.height, res.width) or s[0] != self.batch:
            raise Unsupported(f"input '{value.name}' of shape {list(s)} does not match the tiles of {res.name}")
        if form.mask is None:
            self.record.approximate(node, f"'{value.name}' is recomputed densely but only its active tiles are used")
        vals = self.tile_gather(form, res, window=(res.tile, res.tile), step=(res.tile, res.tile), offset=(0, 0),
                                hint=f"tiles::{value.name}")
        return Sparse(value.name, vals, res, form.mask)  # type: ignore[arg-type]

    def broadcast_operand(self, value: ir.Value, res: Resolution) -> ir.Value:
        """A non-spatial operand of an element-wise op, made to broadcast against [N, C, T, T] tiles."""
        form = self.forms.get(value)
        if not isinstance(form, Dense):
            raise Unsupported(f"operand '{value.name}' cannot broadcast against tiles")
        s = static_shape(value)
        if s is None:
            raise Unsupported(f"operand '{value.name}' has no static shape")
        if len(s) == 4 and s[0] > 1:
            return self.graph.op("Gather", [form.value, self.grids.batch_index(res)], hint=f"per_tile::{value.name}",
                                 axis=0)
        return form.value

    def to_dense(self, value: ir.Value) -> ir.Value:
        """The value as a full tensor (TileScatter of a Sparse value into its cache)."""
        return self._form_to_dense(value.name, self.forms.get(value))

    def scattered(self, name: str) -> ir.Value:
        """The full tensor a token scatter made of the Tokens value ``name`` (its cache's new value)."""
        if name not in self._token_dense:
            raise CompileError(f"internal: token cache '{name}' is read but was never scattered")
        return self._token_dense[name]

    def _form_to_dense(self, name: str, form: Form) -> ir.Value:
        if isinstance(form, Dense):
            return form.value
        if isinstance(form, Tokens):
            if form.source not in self._token_dense:
                cache = self.caches.cache(form.source, resolution=form.res.name)
                index = self.grids.token_index(form.res)
                full = None
                # one batch item, or items sharing one tile set: scatter in the cache's own layout
                if form.res.name in self.grids.shared_batch or self.grids.batch == 1:
                    full = scatter_items(self.graph, cache, form.vals, form.layout, index, f"full::{name}")
                self._token_dense[form.source] = full if full is not None else scatter_tokens(
                    self.graph, cache, form.vals, form.layout, index, f"full::{name}")
            return self._token_dense[form.source]
        if name not in self._dense_of:
            if isinstance(form, Padded):
                # a Pad kept virtual for a gather, read by a dense node after all (e.g. a convolution
                # on a dense resolution): pad the full inner tensor
                top, left, bottom, right = form.pads
                pads = self.graph.const(np.array([0, 0, top, left, 0, 0, bottom, right], np.int64), "c:pads")
                inner_name = form.inner.source if isinstance(form.inner, Sparse) else f"{name}::inner"
                inner = self._form_to_dense(inner_name, form.inner)
                mode = {"zeros": "constant"}.get(form.mode, form.mode)
                self._dense_of[name] = self.graph.op("Pad", [inner, pads], hint=f"full::{name}", mode=mode)
            else:
                cache = self.caches.cache(form.source, resolution=form.res.name)
                self._dense_of[name] = self.graph.op(
                    "TileScatter", [cache, form.vals, self.grids.coords(form.res)], hint=f"full::{name}",
                    domain=SIGEC_DOMAIN)
        return self._dense_of[name]
