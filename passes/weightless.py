"""Serialising models without their weights.

Protobuf cannot serialise a message over 2 GiB, and a full-size Stable Diffusion UNet holds 3.4 GiB
of weights. Nothing the compiler serialises for analysis (onnx shape inference, an ONNX Runtime
shape run) or for the engine file (graphs without initializers, weights.bin beside them) needs the
weights' bytes in the protobuf: :func:`weights_detached` takes the initializers' tensors off the
graph for the duration of a serialisation, and :func:`weightless_proto` serialises a model that
way and returns the detached weights as arrays (views where the tensor allows: no copies).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir

SERDE_LOGGER = "onnx_ir.serde"  # warns once per initializer without a value; expected here


@contextlib.contextmanager
def weights_detached(model: ir.Model, min_bytes: int = 0) -> Iterator[dict[str, ir.TensorProtocol]]:
    """Within the block, the main graph's initializers of at least ``min_bytes`` have no constant
    value, so serialising the model writes their names, types and shapes but not their bytes.
    Yields name -> detached tensor; the tensors are put back on exit."""
    detached: dict[str, tuple[ir.Value, ir.TensorProtocol]] = {}
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is not None and tensor.nbytes >= min_bytes:
            detached[name] = (value, tensor)
            if value.dtype is None:
                value.dtype = tensor.dtype
            if value.shape is None:
                value.shape = ir.Shape(tensor.shape)
            value.const_value = None
    logger = logging.getLogger(SERDE_LOGGER)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield {name: tensor for name, (_, tensor) in detached.items()}
    finally:
        logger.setLevel(level)
        for value, tensor in detached.values():
            value.const_value = tensor


def drop_value_info(proto: onnx.ModelProto, names: set[str]) -> None:
    """Remove the value_info entries the serialiser wrote for detached initializers."""
    keep = [v for v in proto.graph.value_info if v.name not in names]
    if len(keep) != len(proto.graph.value_info):
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(keep)


def tensor_array(tensor: ir.TensorProtocol) -> np.ndarray:
    """A tensor's values as a C-ordered numpy array of the tensor's shape (a view when the tensor is
    one already; ``np.ascontiguousarray`` would turn a scalar into shape [1])."""
    return np.asarray(tensor.numpy(), order="C")


def weightless_proto(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The model as a protobuf without initializers, and its initializers as name -> array."""
    with weights_detached(model) as detached:
        proto = ir.serde.serialize_model(model)
    drop_value_info(proto, set(detached))
    return proto, {name: tensor_array(tensor) for name, tensor in detached.items()}
