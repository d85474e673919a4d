"""Annotate the ``ai.sigec`` nodes of a graph for TensorRT's ONNX parser (and decode them back).

TensorRT's ONNX parser maps a node it does not know to a plugin whose name is the node's
``op_type`` in the namespace given by the node's string attribute ``plugin_namespace``; an int
attribute ``aot = 1`` selects the plugin's ahead-of-time implementation (the PTX compiled into the
plan, so the plan runs without Python). The node's other attributes become the plugin's
attributes; a plugin has a fixed list of inputs. See :mod:`sigec.gpu.tensorrt_plugins` for
the documentation pages this follows.

Attribute encoding (one array per type: the form of plugin attributes the TensorRT sample
exercises with the ONNX parser, ``numpy.typing.NDArray`` of int32 / float32):

- ``geometry`` ints[9]: ``window[0], window[1], step[0], step[1], offset[0], offset[1], upsample,
  pad_mode, activation`` with ``pad_mode`` and ``activation`` as their index in
  :data:`PAD_MODES` / :data:`ACTIVATIONS` (the codes of ``triton_ops``);
- ``params`` floats[2]: ``alpha, beta`` (float32, as ONNX stores them: exact round trip).

Input signatures: ``TileGather(base, vals?, grid?, coords, scale?, shift?)`` becomes one plugin
per combination of present optional inputs, named ``TileGather`` plus ``_vals`` (vals and grid),
``_scale``, ``_shift`` in that order (8 plugins); the annotated node lists only the present inputs.
``TileScatter(base, vals, coords)`` has no optional inputs and keeps its name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from sigec.core.errors import CompileError
from sigec.core.ops import ACTIVATIONS, PAD_MODES  # the codes of the kernels: their positions
from sigec.core.ops import DOMAIN as SIGEC_DOMAIN
from sigec.core.tensorrt_abi import (ALL_GATHER_PLUGINS, GATHER_ATTRS, GATHER_DEFAULTS, INT32, OPTIONAL_GROUPS,  # noqa: F401
                                     PLUGIN_NAMESPACE, TRT_DOMAIN, decode_gather_attrs, gather_plugin_groups,
                                     gather_plugin_name)

_GROUP_SLOTS = {"vals": (1, 2), "scale": (4,), "shift": (5,)}  # positions in TileGather's input list


@dataclasses.dataclass(frozen=True)
class Call:
    """One operator call: op_type, input names ('' = absent) and attribute values by name."""

    op_type: str
    inputs: tuple[str, ...]
    attrs: Mapping[str, Any]


# ---------------------------------------------------------------------------------------------- encoding


def encode_call(call: Call, where: str = "") -> Call:
    """The annotated form of an ``ai.sigec`` call (op_type = plugin name, present inputs, encoded attributes)."""
    label = where or call.op_type
    inputs = list(call.inputs)
    if call.op_type == "TileScatter":
        if len(inputs) != 3 or not all(inputs):
            raise CompileError(f"{label}: TileScatter needs base, vals and coords, got inputs {inputs}")
        if call.attrs:
            raise CompileError(f"{label}: TileScatter has no attributes, got {sorted(call.attrs)}")
        return Call("TileScatter", tuple(inputs), {"plugin_namespace": PLUGIN_NAMESPACE, "aot": 1})
    if call.op_type != "TileGather":
        raise CompileError(f"{label}: no TensorRT plugin for ai.sigec::{call.op_type}")
    if not 4 <= len(inputs) <= 6:
        raise CompileError(f"{label}: TileGather takes 4 to 6 inputs, got {len(inputs)}")
    inputs += [""] * (6 - len(inputs))
    if not inputs[0] or not inputs[3]:
        raise CompileError(f"{label}: TileGather needs base and coords, got inputs {inputs}")
    if bool(inputs[1]) != bool(inputs[2]):
        raise CompileError(f"{label}: TileGather takes vals and grid together, got inputs {inputs}")
    present = [g for g in OPTIONAL_GROUPS if inputs[_GROUP_SLOTS[g][0]]]
    unknown = set(call.attrs) - set(GATHER_ATTRS)
    if unknown:
        raise CompileError(f"{label}: unknown TileGather attributes {sorted(unknown)}")
    a = {**GATHER_DEFAULTS, **call.attrs}
    for key in ("window", "step"):
        if key not in call.attrs:
            raise CompileError(f"{label}: TileGather needs the attribute {key!r}")
    for key in ("window", "step", "offset"):
        if len(a[key]) != 2:
            raise CompileError(f"{label}: {key} must have 2 values, got {list(a[key])}")
    if a["pad_mode"] not in PAD_MODES:
        raise CompileError(f"{label}: unknown pad_mode {a['pad_mode']!r}")
    if a["activation"] not in ACTIVATIONS:
        raise CompileError(f"{label}: unknown activation {a['activation']!r}")
    geometry = [*a["window"], *a["step"], *a["offset"], a["upsample"], PAD_MODES.index(a["pad_mode"]),
                ACTIVATIONS.index(a["activation"])]
    geometry = [int(v) for v in geometry]
    if any(not INT32[0] <= v <= INT32[1] for v in geometry):
        raise CompileError(f"{label}: geometry {geometry} does not fit int32")
    params = np.asarray([a["alpha"], a["beta"]], dtype=np.float32)
    if not np.array_equal(params.astype(np.float64), np.asarray([a["alpha"], a["beta"]], dtype=np.float64)):
        raise CompileError(f"{label}: alpha/beta {a['alpha']}, {a['beta']} are not float32 values")
    kept = tuple(name for name in inputs if name)
    return Call(gather_plugin_name(present), kept, {"plugin_namespace": PLUGIN_NAMESPACE, "aot": 1,
                                                   "geometry": geometry, "params": params.tolist()})


def decode_call(call: Call, where: str = "") -> Call:
    """Inverse of :func:`encode_call`: the canonical ``ai.sigec`` call (every TileGather attribute
    written out, trailing absent inputs dropped)."""
    label = where or call.op_type
    if call.attrs.get("plugin_namespace") != PLUGIN_NAMESPACE:
        raise ValueError(f"{label}: not a sigec plugin node (plugin_namespace {call.attrs.get('plugin_namespace')!r})")
    if call.op_type == "TileScatter":
        return Call("TileScatter", tuple(call.inputs), {})
    groups = gather_plugin_groups(call.op_type)
    given = iter(call.inputs)
    inputs = [next(given)]
    inputs += [next(given), next(given)] if "vals" in groups else ["", ""]
    inputs.append(next(given))
    inputs += [next(given) if g in groups else "" for g in ("scale", "shift")]
    if next(given, None) is not None:
        raise ValueError(f"{label}: more inputs than plugin {call.op_type} takes")
    while inputs[-1] == "":
        inputs.pop()
    return Call("TileGather", tuple(inputs), decode_gather_attrs(call.attrs["geometry"], call.attrs["params"], label))


# ---------------------------------------------------------------------------------------------- ONNX protos


def _proto_call(node: onnx.NodeProto) -> Call:
    return Call(node.op_type, tuple(node.input), {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _proto_node(node: onnx.NodeProto, call: Call, domain: str) -> onnx.NodeProto:
    attrs = {}
    for key, value in call.attrs.items():
        if key == "geometry":
            value = [int(v) for v in value]
        elif key == "params":
            value = [float(v) for v in value]
        attrs[key] = value
    out = onnx.helper.make_node(call.op_type, list(call.inputs), list(node.output), name=node.name or None,
                                domain=domain, **attrs)
    if node.doc_string:
        out.doc_string = node.doc_string
    return out


def encode_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """The annotated copy of one ``ai.sigec`` node proto."""
    call = _proto_call(node)
    call = Call(call.op_type, call.inputs, {k: _plain(v) for k, v in call.attrs.items()})
    return _proto_node(node, encode_call(call, where=f"node '{node.name}' ({node.op_type})"), TRT_DOMAIN)


def decode_node(node: onnx.NodeProto) -> onnx.NodeProto:
    """The ``ai.sigec`` node proto an annotated node stands for (inverse of :func:`encode_node`)."""
    call = _proto_call(node)
    call = Call(call.op_type, call.inputs, {k: _plain(v) for k, v in call.attrs.items()})
    return _proto_node(node, decode_call(call, where=f"node '{node.name}' ({node.op_type})"), SIGEC_DOMAIN)


def _rewrite_graph(graph: onnx.GraphProto, domain: str, convert) -> int:
    count = 0
    for i, node in enumerate(graph.node):
        if node.domain == domain:
            graph.node[i].CopyFrom(convert(node))
            count += 1
    return count


def _set_opsets(model: onnx.ModelProto, add: str, remove: str) -> None:
    kept = [o for o in model.opset_import if o.domain not in (add, remove)]
    del model.opset_import[:]
    model.opset_import.extend(kept + [onnx.helper.make_opsetid(add, 1)])


def annotate(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``ai.sigec`` nodes are annotated for TensorRT (runs :class:`AnnotateTensorRTPass`)."""
    ir_model = ir.serde.deserialize_model(onnx.ModelProto.FromString(model.SerializeToString()))
    AnnotateTensorRTPass()(ir_model)
    return ir.serde.serialize_model(ir_model)


def decode(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of an annotated ``model`` with its ``ai.sigec`` nodes restored (inverse of :func:`annotate`)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    _rewrite_graph(out.graph, TRT_DOMAIN, decode_node)
    _set_opsets(out, SIGEC_DOMAIN, TRT_DOMAIN)
    return out


# ---------------------------------------------------------------------------------------------- the pass


class AnnotateTensorRTPass(ir.passes.InPlacePass):
    """Rewrite every ``ai.sigec`` node into the node form TensorRT's ONNX parser maps to sigec's plugins.

    Rewrite rules:
    1. ``ai.sigec::TileScatter(base, vals, coords)`` becomes ``TileScatter(base, vals, coords)`` in
       domain ``ai.sigec.tensorrt`` with ``plugin_namespace = "sigec"`` and ``aot = 1``.
    2. ``ai.sigec::TileGather(base, vals?, grid?, coords, scale?, shift?)`` becomes
       ``TileGather[_vals][_scale][_shift](present inputs)`` in that domain, with
       ``plugin_namespace``, ``aot``, ``geometry`` (ints) and ``params`` (floats) as in the module
       docstring; absent optional inputs are dropped (the plugin name says which are present).
    3. Output values, node names and the graph's other nodes are unchanged; the model imports
       domain ``ai.sigec.tensorrt`` (version 1) instead of ``ai.sigec``.
    Malformed sigec nodes raise CompileError naming the node.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        modified = False
        for node in list(graph):
            if node.domain != SIGEC_DOMAIN:
                continue
            where = f"node '{node.name}' ({node.op_type})"
            attrs = {name: _plain(a.value) for name, a in node.attributes.items()}
            inputs = tuple("" if v is None else v.name for v in node.inputs)
            encoded = encode_call(Call(node.op_type, inputs, attrs), where=where)
            new_inputs = [v for v in node.inputs if v is not None]
            new_attrs = [
                ir.AttrString("plugin_namespace", PLUGIN_NAMESPACE),
                ir.AttrInt64("aot", 1),
            ]
            if "geometry" in encoded.attrs:
                new_attrs += [ir.AttrInt64s("geometry", list(encoded.attrs["geometry"])),
                              ir.AttrFloat32s("params", list(encoded.attrs["params"]))]
            new = ir.Node(TRT_DOMAIN, encoded.op_type, new_inputs, new_attrs, num_outputs=len(node.outputs),
                          name=node.name)
            for old_value, new_value in zip(node.outputs, new.outputs):
                new_value.name = old_value.name
                new_value.shape, new_value.type = old_value.shape, old_value.type
            ir.convenience.replace_nodes_and_values(graph, node, [node], [new], list(node.outputs),
                                                    list(new.outputs))
            modified = True
        if modified:
            model.opset_imports.pop(SIGEC_DOMAIN, None)
            model.opset_imports[TRT_DOMAIN] = 1
        return ir.passes.PassResult(model, modified)
