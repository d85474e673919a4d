"""State shared by the sparse rewrite rules: forms of values, caches, tile indices, conversions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from sigec.core.errors import CompileError
from sigec.core.names import cache_input, coords_input, grid_input
from sigec.core.options import DEFAULT_TILE_SIZE
from sigec.passes._ir_utils import static_shape
from sigec.passes.graph_builder import SIGEC_DOMAIN, GraphBuilder
from sigec.passes.mask_builder import MaskProgramBuilder
from sigec.passes.sparse_forms import EMPTY_MASK, Dense, Form, Padded, Prologue, Resolution, Sparse, View


class Unsupported(Exception):
    """Raised by a rule when a node cannot be rewritten sparsely (reason in the message)."""


@dataclass
class CacheSpec:
    """A tensor the FULL graph produces for the SPARSE graph (``kind``: activation, static, stats)."""

    name: str
    source: str
    shape: list[int]
    dtype: str
    kind: str
    resolution: str | None = None


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


@dataclass
class StatsRequest:
    """Frozen normalisation statistics the FULL graph must produce: per-channel scale and shift."""

    x: str
    scale_cache: str
    shift_cache: str
    match: Any


@dataclass
class RewriteContext:
    """Everything the rules need: the builder, forms of values, resolutions, caches, masks."""

    model: ir.Model
    mode: str
    batch: int
    tile_size: int | dict[str, int]
    builder: GraphBuilder
    masks: MaskProgramBuilder
    dense_resolutions: frozenset[str] = frozenset()
    forms: dict[str, Form] = field(default_factory=dict)
    resolutions: dict[tuple[int, int], Resolution] = field(default_factory=dict)
    res_masks: dict[str, list[str | None]] = field(default_factory=dict)
    caches: dict[str, CacheSpec] = field(default_factory=dict)
    stats: list[StatsRequest] = field(default_factory=list)
    reports: list[NodeReport] = field(default_factory=list)
    approximations: list[dict[str, Any]] = field(default_factory=list)
    used_initializers: set[str] = field(default_factory=set)
    _dense_of: dict[str, str] = field(default_factory=dict)
    _batch_index: dict[str, str] = field(default_factory=dict)
    _values: dict[str, ir.Value] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._values = {v.name: v for v in self.model.graph.inputs}
        self._values.update({out.name: out for node in self.model.graph for out in node.outputs})

    # ----- values -------------------------------------------------------------------------
    @property
    def exact(self) -> bool:
        """True in exact mode."""
        return self.mode == "exact"

    def form(self, value: ir.Value) -> Form:
        """The form of an original value (constants and static values become Dense lazily)."""
        if value.name in self.forms:
            return self.forms[value.name]
        if value.const_value is not None:
            self.used_initializers.add(value.name)
            return Dense(value.name, EMPTY_MASK)
        raise CompileError(f"internal: value '{value.name}' has no form (not topologically sorted?)")

    def is_edit_dependent(self, value: ir.Value | None) -> bool:
        """True when the value may change with the edit (it has a Sparse/Padded form or a non-empty mask)."""
        if value is None or value.name not in self.forms:
            return False
        f = self.forms[value.name]
        return not (isinstance(f, Dense) and f.mask == EMPTY_MASK)

    def shape(self, value: ir.Value) -> tuple[int, ...]:
        """Static shape of an original value."""
        s = static_shape(value)
        if s is None:
            raise CompileError(f"value '{value.name}' has no static shape")
        return s

    def is_spatial(self, value: ir.Value) -> bool:
        """A feature map: 4-D, batch-sized, with more than one pixel."""
        s = static_shape(value)
        return s is not None and len(s) == 4 and s[0] == self.batch and s[2] * s[3] > 1

    # ----- resolutions and tile indices ---------------------------------------------------------
    def resolution(self, height: int, width: int) -> Resolution:
        """The tile grid for maps of ``height x width`` (created on first use)."""
        key = (height, width)
        if key not in self.resolutions:
            if isinstance(self.tile_size, dict):
                tile = int(self.tile_size.get(f"r{height}x{width}", self.tile_size.get("default", DEFAULT_TILE_SIZE)))
            else:
                tile = int(self.tile_size)
            self.resolutions[key] = Resolution(height, width, tile)
            self.res_masks[self.resolutions[key].name] = []
        return self.resolutions[key]

    def dense_resolution_of(self, node: ir.Node) -> str | None:
        """The name of the resolution forced dense (``dense_resolutions``) that one of the node's
        spatial outputs lies on, or None."""
        for out in node.outputs:
            s = static_shape(out)
            if s is not None and self.is_spatial(out) and f"r{s[2]}x{s[3]}" in self.dense_resolutions:
                return f"r{s[2]}x{s[3]}"
        return None

    def res_of(self, value: ir.Value) -> Resolution:
        """The resolution of a spatial value."""
        s = self.shape(value)
        return self.resolution(s[2], s[3])

    def coords(self, res: Resolution) -> str:
        """Name of the coords input [N, 3] of a resolution."""
        return self.builder.add_input(coords_input(res.name), onnx.TensorProto.INT64, [f"n_{res.name}", 3])

    def grid(self, res: Resolution) -> str:
        """Name of the grid input [B, gh, gw] of a resolution."""
        return self.builder.add_input(grid_input(res.name), onnx.TensorProto.INT64, [self.batch, *res.grid_shape])

    def batch_index(self, res: Resolution) -> str:
        """Name of the [N] batch index of every active tile of a resolution."""
        if res.name not in self._batch_index:
            idx = self.builder.const(np.array(0, np.int64), "c:zero")
            self._batch_index[res.name] = self.builder.node1(
                "Gather", [self.coords(res), idx], hint=f"batch_of_tiles::{res.name}", axis=1)
        return self._batch_index[res.name]

    # ----- forms of new values ------------------------------------------------------------------
    def set_sparse(self, value: ir.Value, vals: str, res: Resolution, mask: str | None,
                   view: View | None = None) -> Sparse:
        """Record that ``value`` is now Sparse with the given tiles."""
        if (self.shape(value)[2], self.shape(value)[3]) != (res.height, res.width):
            raise CompileError(f"internal: '{value.name}' is {self.shape(value)} but its tiles are on {res.name}")
        form = Sparse(value.name, vals, res, mask, view)
        self.forms[value.name] = form
        self.res_masks[res.name].append(mask)
        return form

    def cache(self, source: str, kind: str = "activation", resolution: str | None = None) -> str:
        """The SPARSE-graph input holding the FULL graph's value ``source`` (registered once)."""
        name = cache_input(source)
        if name not in self.caches:
            value = self.value_by_name(source)
            shape = list(self.shape(value))
            elem = value.dtype.value if value.dtype is not None else onnx.TensorProto.FLOAT
            self.caches[name] = CacheSpec(name, source, shape, onnx.helper.tensor_dtype_to_np_dtype(elem).name,
                                          kind, resolution)
            self.builder.add_input(name, elem, shape)
        return name

    def stats_cache(self, name: str, source: str, shape: list[int]) -> str:
        """A cache input holding normalisation statistics computed by the FULL graph."""
        if name not in self.caches:
            self.caches[name] = CacheSpec(name, source, shape, "float32", "stats")
            self.builder.add_input(name, onnx.TensorProto.FLOAT, shape)
        return name

    def value_by_name(self, name: str) -> ir.Value:
        """The original model's value called ``name``."""
        return self._values[name]

    # ----- conversions -----------------------------------------------------------------------
    def gather_source(self, form: Form) -> tuple[Sparse | Dense, Prologue | None, int, tuple[int, int, int, int], str]:
        """Resolve views and pads: (inner form, prologue, upsample factor, extra pads, pad mode)."""
        pads, mode = (0, 0, 0, 0), "zeros"
        if isinstance(form, Padded):
            pads, mode = form.pads, form.mode
            form = form.inner
        prologue, upsample = None, 1
        if isinstance(form, Sparse) and form.view is not None:
            view = form.view
            inner = view.inner
            if isinstance(inner, Sparse) and inner.view is not None and view.prologue is None:
                # nearest(upsample) of a prologue view: the prologue commutes with the upsampling
                prologue, upsample = inner.view.prologue, inner.view.upsample * view.upsample
                inner = inner.view.inner
            else:
                prologue, upsample = view.prologue, view.upsample
            form = inner
        return form, prologue, upsample, pads, mode

    def tile_gather(self, form: Form, out_res: Resolution, *, window: Sequence[int], step: Sequence[int],
                    offset: Sequence[int], pad_mode: str = "zeros", upsample: int = 1,
                    prologue: Prologue | None = None, hint: str) -> str:
        """Emit a TileGather reading ``form`` for the active tiles of ``out_res``."""
        if isinstance(form, Sparse):
            base, vals, grid = self.cache(form.source, resolution=form.res.name), form.vals, self.grid(form.res)
        elif isinstance(form, Dense):
            base, vals, grid = form.name, None, None
        else:
            raise Unsupported("a padded tensor must feed a convolution or pooling directly")
        p = prologue or Prologue()
        inputs = [base, vals, grid, self.coords(out_res), p.scale, p.shift]
        while inputs and inputs[-1] is None:
            inputs.pop()
        return self.builder.node1("TileGather", inputs, hint=hint, domain=SIGEC_DOMAIN,
                                  window=[int(w) for w in window], step=[int(s) for s in step],
                                  offset=[int(o) for o in offset], upsample=int(upsample), pad_mode=pad_mode,
                                  activation=p.activation, alpha=float(p.alpha), beta=float(p.beta))

    def to_sparse(self, value: ir.Value, res: Resolution, node: ir.Node) -> Sparse:
        """The value as tiles of ``res`` (gathering from a full tensor when it is Dense)."""
        form = self.form(value)
        if isinstance(form, Sparse):
            if form.res != res:
                raise Unsupported(f"input '{value.name}' is on {form.res.name}, the node's output on {res.name}")
            return form
        if isinstance(form, Padded):
            raise Unsupported("a padded tensor must feed a convolution or pooling directly")
        s = self.shape(value)
        if (s[2], s[3]) != (res.height, res.width) or s[0] != self.batch:
            raise Unsupported(f"input '{value.name}' of shape {list(s)} does not match the tiles of {res.name}")
        if form.mask is None:
            self.approximate(node, f"'{value.name}' is recomputed densely but only its active tiles are used")
        vals = self.tile_gather(form, res, window=(res.tile, res.tile), step=(res.tile, res.tile), offset=(0, 0),
                                hint=f"tiles::{value.name}")
        return Sparse(value.name, vals, res, form.mask)

    def broadcast_operand(self, value: ir.Value, res: Resolution) -> str:
        """A non-spatial operand of an element-wise op, made to broadcast against [N, C, T, T] tiles."""
        form = self.form(value)
        if not isinstance(form, Dense):
            raise Unsupported(f"operand '{value.name}' cannot broadcast against tiles")
        s = static_shape(value)
        if s is None:
            raise Unsupported(f"operand '{value.name}' has no static shape")
        if len(s) == 4 and s[0] > 1:
            return self.builder.node1("Gather", [form.name, self.batch_index(res)], hint=f"per_tile::{value.name}",
                                      axis=0)
        return form.name

    def to_dense(self, value: ir.Value) -> str:
        """The value as a full tensor (TileScatter of a Sparse value into its cache)."""
        form = self.form(value)
        if isinstance(form, Dense):
            return form.name
        if isinstance(form, Padded):
            raise Unsupported("a padded tensor must feed a convolution or pooling directly")
        if value.name not in self._dense_of:
            self._dense_of[value.name] = self.builder.node1(
                "TileScatter", [self.cache(form.source, resolution=form.res.name), form.vals, self.coords(form.res)],
                hint=f"full::{value.name}", domain=SIGEC_DOMAIN)
        return self._dense_of[value.name]

    def approximate(self, node: ir.Node, detail: str) -> None:
        """Record that the sparse result of ``node`` is an approximation."""
        self.approximations.append({"node": node.name, "op_type": node.op_type, "detail": detail})

    def report(self, node: ir.Node, kind: str, **fields: Any) -> NodeReport:
        """Record the rewrite decision for a node."""
        rep = NodeReport(node.name, node.op_type, kind, **fields)
        self.reports.append(rep)
        return rep
