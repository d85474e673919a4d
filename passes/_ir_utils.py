"""Small helpers shared by the passes: constant access, attribute access, shapes."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import onnx_ir as ir


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant array held by ``value`` (initializer or folded constant), or None."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """An attribute's Python value (ints, floats, strings decoded), or ``default``."""
    a = node.attributes.get(name)
    if a is None:
        return default
    v = a.value
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    return v


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    """The fully static shape of ``value``, or None when unknown or symbolic."""
    if value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def node_label(node: ir.Node) -> str:
    """A human readable reference to a node for error messages: ``'name' (OpType)``."""
    return f"'{node.name or '<unnamed>'}' ({node.op_type})"


def make_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Add ``array`` as a new initializer of ``graph`` under a unique name derived from ``name``."""
    existing = set(graph.initializers)
    unique, i = name, 0
    while unique in existing:
        i += 1
        unique = f"{name}_{i}"
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=unique))
    graph.register_initializer(value)
    return value


def conv_pads(node: ir.Node, spatial_rank: int = 2) -> list[int]:
    """Explicit pads of a Conv-like node (auto_pad NOTSET assumed by the caller)."""
    pads = attr(node, "pads")
    return list(pads) if pads is not None else [0] * (2 * spatial_rank)


def ints(values: Sequence[Any]) -> list[int]:
    """Plain Python ints (numpy scalars converted), for attributes and JSON."""
    return [int(v) for v in values]
