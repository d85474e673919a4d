"""ONNX frontend: load a model file, pin its shapes and bring it into sigec's canonical form
(:func:`canonicalize`): models of older opsets, with shapes onnx cannot infer or with 5-D
convolutions over a singleton axis included."""

from __future__ import annotations

import os
import re
from typing import Mapping, Sequence

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnxscript.optimizer

from sigec.core.errors import CompileError
from sigec.core.options import DEFAULT_OPSET
from sigec.passes._ir_utils import static_shape
from sigec.passes.decompose_attention import DecomposeAttentionPass
from sigec.passes.fold_batchnorm import FoldBatchNormPass
from sigec.passes.fold_pad_into_conv import FoldPadIntoConvPass
from sigec.passes.focus_to_space_to_depth import FocusToSpaceToDepthPass
from sigec.passes.squeeze_singleton_axes import SqueezeSingletonAxesPass
from sigec.passes.weightless import drop_value_info, tensor_array, weights_detached

SHAPE_CONSTANT_BYTES = 1024  # initializers up to this size stay in the models serialised for shape inference


def load_onnx(source: str | os.PathLike | onnx.ModelProto | ir.Model,
              input_shapes: Mapping[str, Sequence[int]] | None = None) -> ir.Model:
    """Load an ONNX model and return it canonicalised (see :func:`canonicalize`).

    A file's external data (models over 2 GiB) stays on disk, memory-mapped, until it is read."""
    if isinstance(source, (onnx.ModelProto, ir.Model)):
        return canonicalize(source, input_shapes)
    path = os.fspath(source)
    if not os.path.exists(path):
        raise CompileError(f"model file not found: {path}")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError, ...
        raise CompileError(f"cannot read ONNX model {path}: {exc}") from exc
    model = _to_ir(proto)
    _check_external_data(model, os.path.dirname(os.path.abspath(path)), path)
    return canonicalize(model, input_shapes)


def _check_external_data(model: ir.Model, base_dir: str, path: str) -> None:
    """Point the model's external tensors at ``base_dir``; a missing data file is a CompileError."""
    ir.external_data.set_base_dir(model.graph, base_dir)
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and not os.path.exists(tensor.path):
            raise CompileError(f"the weight '{value.name}' of {path} is stored in the external data file "
                               f"'{tensor.location}', which does not exist ({tensor.path})")


def _model_inputs(model: ir.Model) -> list[ir.Value]:
    """The graph inputs that are not initializers (IR version < 4 lists initializers as inputs too)."""
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def _dims(value: ir.Value) -> list[int | str]:
    return ["?" if d is None else (d if isinstance(d, int) else (d.value or "?")) for d in (value.shape or [])]


def _pin_input_shapes(model: ir.Model, input_shapes: Mapping[str, Sequence[int]]) -> None:
    inputs = {v.name: v for v in _model_inputs(model)}
    for name, shape in input_shapes.items():
        if name not in inputs:
            raise CompileError(f"--input-shape names '{name}', which is not a model input "
                               f"(inputs: {', '.join(inputs)})")
        value = inputs[name]
        dims = list(value.shape) if value.shape is not None else []
        if len(dims) != len(shape):
            raise CompileError(f"input '{name}' has rank {len(dims)}, but the pinned shape {tuple(shape)} "
                               f"has rank {len(shape)}")
        for dim, size in zip(dims, shape):
            if isinstance(dim, int) and dim not in (0, int(size)):
                raise CompileError(f"input '{name}' has static size {dim} where the pinned shape "
                                   f"says {size}")
        value.shape = ir.Shape([int(size) for size in shape])


def _check_static_inputs(model: ir.Model) -> None:
    for value in _model_inputs(model):
        dims = list(value.shape) if value.shape is not None else []
        if value.shape is None or any(not isinstance(d, int) or d <= 0 for d in dims):
            raise CompileError(f"input '{value.name}' has a dynamic shape {_dims(value)}; pin it with "
                               f"--input-shape {value.name}=" + ",".join("N" for _ in dims) +
                               " (Python: input_shapes={...})")


# Ops whose output has the shape and type of their first input (used where ONNX shape inference,
# e.g. for function ops such as GroupNormalization, leaves the output shape unknown).
SHAPE_PRESERVING = {"GroupNormalization", "LayerNormalization", "InstanceNormalization", "BatchNormalization",
                    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "HardSwish", "Mish", "Gelu", "Softplus",
                    "Identity", "Dropout"}


def _fill_shape_preserving(model: ir.Model) -> bool:
    """Give shape-preserving nodes with unknown output shapes their input's shape; True if any changed."""
    changed = False
    for node in model.graph:
        out = node.outputs[0] if node.outputs else None
        src = node.inputs[0] if node.inputs else None
        if node.op_type in SHAPE_PRESERVING and out is not None and src is not None and static_shape(out) is None \
                and static_shape(src) is not None:
            out.shape = ir.Shape(static_shape(src))
            if out.type is None:
                out.type = src.type
            changed = True
    return changed


def _default_opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _nodes_named_in(model: ir.Model, message: str) -> list[ir.Node]:
    """Nodes of the main graph whose op type the message names (the version converter names ops only)."""
    named = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", message))
    return [n for n in model.graph if n.domain in ("", "ai.onnx") and n.op_type in named]


def _convert_opset(model: ir.Model) -> ir.Model:
    """A model of an older default opset converted to DEFAULT_OPSET (the sparse rewrite emits nodes of
    that opset, and constant folding writes Constant attributes that older opsets do not have).
    Models of older opsets are small: the conversion serialises the model with its weights."""
    version = _default_opset(model)
    if version is None or version >= DEFAULT_OPSET:
        return model
    for node in model.graph:
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            raise CompileError(f"node '{node.name}' ({node.op_type}) is not an ONNX operator (opset {version})")
    try:
        converted = onnx.version_converter.convert_version(ir.to_proto(model), DEFAULT_OPSET)
    except Exception as exc:  # the converter raises RuntimeError / IndexError with C++ assertion text
        message = " ".join(str(exc).split())
        culprits = _nodes_named_in(model, message)
        where = ("at " + ", ".join(f"node '{n.name}' ({n.op_type})" for n in culprits[:5])
                 + (f" and {len(culprits) - 5} more" if len(culprits) > 5 else "") + ": ") if culprits else ""
        raise CompileError(f"cannot convert the model from opset {version} to opset {DEFAULT_OPSET} (onnx version "
                           f"converter) {where}{message}") from exc
    return _to_ir(converted)


def _to_ir(proto: onnx.ModelProto) -> ir.Model:
    try:
        return ir.from_proto(proto)
    except Exception as exc:
        raise CompileError(f"cannot read the ONNX model's graph: {exc}") from exc


def _value_shapes(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    return {v.name: v.type for v in (*proto.graph.value_info, *proto.graph.output)}


def _infer_shapes(model: ir.Model) -> None:
    """Merge the shapes onnx shape inference finds (non-strict: it skips nodes it cannot infer) into
    values whose shape is not static. A failure of the whole inference leaves the model as it was
    (ONNX Runtime fills in what is missing, see :func:`_shapes_from_onnxruntime`)."""
    # Weights do not decide shapes: they go in as typed inputs, which keeps the serialized model small
    # (and under protobuf's 2 GiB). Small constants stay: shape computations read them.
    with weights_detached(model, SHAPE_CONSTANT_BYTES + 1) as detached:
        proto = ir.to_proto(model)
    drop_value_info(proto, set(detached))
    listed = {i.name for i in proto.graph.input}  # IR version < 4 lists initializers as inputs too
    proto.graph.input.extend(onnx.helper.make_tensor_value_info(name, int(t.dtype), list(t.shape))
                             for name, t in detached.items() if name not in listed)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    except Exception:  # e.g. a conflict between a stored and an inferred shape; ONNX Runtime decides
        return
    types = _value_shapes(inferred)
    for node in model.graph:
        for out in node.outputs:
            t = types.get(out.name)
            if static_shape(out) is not None or t is None or not t.tensor_type.HasField("shape"):
                continue
            dims = t.tensor_type.shape.dim
            out.shape = ir.Shape([d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims])
            if out.dtype is None and t.tensor_type.elem_type:
                out.dtype = ir.DataType(t.tensor_type.elem_type)


def _missing_shapes(model: ir.Model) -> list[ir.Value]:
    """Node outputs that something reads (or the graph returns) and whose shape is not static."""
    return [out for node in model.graph for out in node.outputs
            if static_shape(out) is None and (out.uses() or out.is_graph_output())]


def _example_inputs(model: ir.Model, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Zeros of every input's (pinned) shape, or random values when ``rng`` is given."""
    feeds = {}
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        dtype, shape = value.dtype.numpy(), static_shape(value)
        if rng is None:
            feeds[value.name] = np.zeros(shape, dtype)
        elif np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[value.name] = np.ones(shape, dtype)
    return feeds


def _shapes_from_onnxruntime(model: ir.Model, values: Sequence[ir.Value]) -> None:
    """Fill the shapes (and types) of ``values`` from one ONNX Runtime run of the model on zeros of the
    pinned input shapes, with those values added as outputs.

    A second run on random inputs must give the same shapes: a shape that depends on the input
    values (NonZero, data-dependent Reshape) cannot be compiled into a static engine.
    """
    import onnxruntime as ort  # only for models whose shapes onnx cannot infer

    with weights_detached(model, SHAPE_CONSTANT_BYTES + 1) as detached:
        proto = ir.to_proto(model)
    drop_value_info(proto, set(detached))
    for name, tensor in detached.items():  # weights go in as external initializers: no 2 GiB limit
        entry = onnx.TensorProto(name=name, data_type=int(tensor.dtype), dims=list(tensor.shape),
                                 data_location=onnx.TensorProto.EXTERNAL)
        entry.external_data.add(key="location", value="sigec-shape-run")
        proto.graph.initializer.append(entry)
    returned = {o.name for o in proto.graph.output}
    names = [v.name for v in values]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in returned)
    options = ort.SessionOptions()
    # Unoptimised, so every requested intermediate exists as computed; quiet, as errors are raised.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    weights = {name: ort.OrtValue.ortvalue_from_numpy(tensor_array(t)) for name, t in detached.items()}
    if weights:
        options.add_external_initializers(list(weights), list(weights.values()))
    nodes = ", ".join(f"'{v.producer().name}' ({v.producer().op_type})" for v in values[:5]) + (
        f" and {len(values) - 5} more" if len(values) > 5 else "")
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        zeros = session.run(names, _example_inputs(model, None))
        other = session.run(names, _example_inputs(model, np.random.default_rng(0)))
    except Exception as exc:
        raise CompileError(f"onnx shape inference left the output shapes of {nodes} open, and ONNX Runtime could "
                           f"not run the model on zeros of the input shapes to find them: "
                           f"{' '.join(str(exc).split())}") from exc
    for value, a, b in zip(values, zeros, other):
        if a.shape != b.shape:
            node = value.producer()
            raise CompileError(f"the output '{value.name}' of node '{node.name}' ({node.op_type}) has a shape that "
                               f"depends on the input values ({list(a.shape)} for zeros, {list(b.shape)} for random "
                               f"inputs); sigec compiles static shapes only")
        value.shape = ir.Shape(list(a.shape))
        if value.dtype is None:
            value.dtype = ir.DataType.from_numpy(a.dtype)


def _complete_shapes(model: ir.Model) -> None:
    """Static shapes for every value that is read: onnx shape inference, the shape-preserving
    fix-up for function ops, then ONNX Runtime for whatever is still open."""
    _infer_shapes(model)
    while _fill_shape_preserving(model):
        _infer_shapes(model)
    missing = _missing_shapes(model)
    if missing:
        _shapes_from_onnxruntime(model, missing)


def _fold_constants(model: ir.Model) -> None:
    try:
        onnxscript.optimizer.fold_constants(model)
    except Exception as exc:  # onnxscript names the node, the cause is chained
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        raise CompileError(f"constant folding failed: {exc}{cause}") from exc


def _apply(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> ir.Model:
    """Run passes in order; a failure names the pass and its cause (passes that reject a node raise
    CompileError themselves, naming it)."""
    for p in passes:
        try:
            model = p(model).model
        except CompileError:
            raise
        except Exception as exc:
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise CompileError(f"canonicalisation pass {type(p).__name__} failed: {cause}") from exc
    return model


def canonicalize(source: onnx.ModelProto | ir.Model,
                 input_shapes: Mapping[str, Sequence[int]] | None = None) -> ir.Model:
    """Bring a model into sigec's canonical form; every failure is a CompileError. A protobuf is left
    as it is; an ``ir.Model`` is transformed in place (and returned). Weights are never serialised
    (models over 2 GiB compile).

    Steps: pin input shapes; convert an older default opset to DEFAULT_OPSET; infer shapes with onnx;
    fold constants; name unnamed nodes and values; complete the shapes (ONNX Runtime on zeros where
    onnx gives up); run 5-D operations over a singleton depth axis as 2-D ones; rewrite "Focus"
    slices as SpaceToDepth; write the Attention operator (opset 23) as MatMul/Softmax; fold Pad
    and BatchNorm into Conv; remove unused nodes; sort; check that
    every value read has a static shape.
    """
    model = _to_ir(source) if isinstance(source, onnx.ModelProto) else source
    if input_shapes:
        _pin_input_shapes(model, input_shapes)
    _check_static_inputs(model)
    model = _convert_opset(model)
    _infer_shapes(model)
    _fold_constants(model)
    # every node and value named (uniquely): reports, errors and cache names refer to them
    model = _apply(model, [ir.passes.common.NameFixPass(), ir.passes.common.RemoveUnusedNodesPass()])
    _complete_shapes(model)
    model = _apply(model, [
        SqueezeSingletonAxesPass(),
        ir.passes.common.RemoveUnusedNodesPass(),  # its leftovers would block the folds below
        FocusToSpaceToDepthPass(),
        DecomposeAttentionPass(),
        FoldPadIntoConvPass(),
        FoldBatchNormPass(),
        ir.passes.common.RemoveUnusedNodesPass(),
        ir.passes.common.TopologicalSortPass(),
    ])
    _complete_shapes(model)
    for value in _missing_shapes(model):
        node = value.producer()
        raise CompileError(f"the output '{value.name}' of node '{node.name}' ({node.op_type}) has no static shape "
                           f"({value.shape}) after shape inference and an ONNX Runtime run")
    return model
