"""ONNX frontend: load a model file, pin its shapes and bring it into sigec's canonical form."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import onnx
import onnx_ir as ir
import onnxscript.optimizer

from sigec.core.errors import CompileError
from sigec.passes._ir_utils import static_shape
from sigec.passes.fold_batchnorm import FoldBatchNormPass
from sigec.passes.fold_pad_into_conv import FoldPadIntoConvPass


def load_onnx(source: str | os.PathLike | onnx.ModelProto,
              input_shapes: Mapping[str, Sequence[int]] | None = None) -> ir.Model:
    """Load an ONNX model and return it canonicalised (see :func:`canonicalize`)."""
    if isinstance(source, onnx.ModelProto):
        proto = source
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise CompileError(f"model file not found: {path}")
        try:
            proto = onnx.load(path)
        except Exception as exc:  # onnx raises DecodeError, OSError, ...
            raise CompileError(f"cannot read ONNX model {path}: {exc}") from exc
    return canonicalize(proto, input_shapes)


def _pin_input_shapes(proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> None:
    initializer_names = {t.name for t in proto.graph.initializer}
    inputs = {i.name: i for i in proto.graph.input if i.name not in initializer_names}
    for name, shape in input_shapes.items():
        if name not in inputs:
            raise CompileError(f"--input-shape names '{name}', which is not a model input "
                               f"(inputs: {', '.join(inputs)})")
        dims = inputs[name].type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise CompileError(f"input '{name}' has rank {len(dims)}, but the pinned shape {tuple(shape)} "
                               f"has rank {len(shape)}")
        for dim, size in zip(dims, shape):
            if dim.HasField("dim_value") and dim.dim_value not in (0, int(size)):
                raise CompileError(f"input '{name}' has static size {dim.dim_value} where the pinned shape "
                                   f"says {size}")
            dim.Clear()
            dim.dim_value = int(size)


def _check_static_inputs(proto: onnx.ModelProto) -> None:
    initializer_names = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in initializer_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") or d.dim_value <= 0 for d in dims):
            shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
            raise CompileError(f"input '{inp.name}' has a dynamic shape {shape}; pin it with "
                               f"--input-shape {inp.name}=" + ",".join("N" for _ in dims) +
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


def canonicalize(proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None = None) -> ir.Model:
    """Pin shapes, infer shapes, fold constants, name unnamed nodes and values, fold Pad/BatchNorm into
    Conv, sort; check static shapes."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    if input_shapes:
        _pin_input_shapes(proto, input_shapes)
    _check_static_inputs(proto)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:
        raise CompileError(f"ONNX shape inference failed: {exc}") from exc
    model = ir.from_proto(proto)
    onnxscript.optimizer.fold_constants(model)
    passes = ir.passes.Sequential(
        # every node and value named (uniquely): reports, errors and cache names refer to them
        ir.passes.common.NameFixPass(),
        ir.passes.common.RemoveUnusedNodesPass(),
        FoldPadIntoConvPass(),
        FoldBatchNormPass(),
        ir.passes.common.RemoveUnusedNodesPass(),
        ir.passes.common.TopologicalSortPass(),
        ir.passes.common.ShapeInferencePass(),
    )
    model = passes(model).model
    if _fill_shape_preserving(model):
        model = ir.passes.common.ShapeInferencePass()(model).model
    for node in model.graph:
        for out in node.outputs:
            if static_shape(out) is None and out.type is not None and out.uses():
                raise CompileError(f"the output '{out.name}' of node '{node.name}' ({node.op_type}) has no static "
                                   f"shape after shape inference ({out.shape}); pin the model inputs with "
                                   f"--input-shape")
    return model
