"""Appends nodes, inputs and constants to an onnx-ir graph under unique, readable names.

The SPARSE graph is built into a new ``ir.Graph``; the FULL graph's statistics nodes are appended to
a clone of the canonical model's graph. Names are derived from hints (``vals::conv1``,
``node:win::conv2``) so that the graphs stay readable and the manifest can name their tensors.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from sigec.core.ops import DOMAIN

SIGEC_DOMAIN = DOMAIN
SIGEC_OPSET = 1


class GraphBuilder:
    """Builds nodes into ``graph`` with ``ir.tape``; names never collide with ``reserved_names``.

    ``const_prefix`` starts the name of every constant: the engine file keeps one copy of each weight by
    name across its graphs, so builders of different graphs (FULL's statistics, SPARSE) must not give
    different constants the same name.
    """

    def __init__(self, graph: ir.Graph, reserved_names: Iterable[str] = (), const_prefix: str = "") -> None:
        self.graph = graph
        self._const_prefix = const_prefix
        self._tape = ir.tape.Tape(graph)
        self._used: set[str] = set(reserved_names)
        self._inputs: dict[str, ir.Value] = {}
        self._initializers: dict[str, ir.Value] = {}
        self._counter = 0

    def fresh(self, hint: str) -> str:
        """A tensor or node name not used before, derived from ``hint``."""
        name = hint
        while name in self._used:
            self._counter += 1
            name = f"{hint}__{self._counter}"
        self._used.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], *, hint: str, domain: str = "",
           output: str | None = None, attributes: Mapping[str, ir.Attr] | None = None,
           **values: Any) -> ir.Value:
        """Append a single-output node; its output is named ``output`` (a reserved name) or from ``hint``.

        Attributes are ``attributes`` (another node's, copied) and keyword Python values (None dropped).
        """
        name = output if output is not None else self.fresh(hint)
        self._used.add(name)
        attrs: dict[str, Any] = dict(attributes or {})
        attrs.update((k, v) for k, v in values.items() if v is not None)
        # In name order, as onnx.helper writes them: the protos stay comparable with decoded ones.
        attrs = dict(sorted(attrs.items()))
        return self._tape.op(op_type, inputs, attrs, domain=domain, name=self.fresh(f"node:{hint}"),
                             output=ir.Value(name=name))

    def ops(self, op_type: str, inputs: Sequence[ir.Value | None], *, hint: str, count: int,
            **values: Any) -> list[ir.Value]:
        """Append a node with ``count`` outputs (named from ``hint``); keyword Python values are attributes."""
        attrs = dict(sorted((k, v) for k, v in values.items() if v is not None))
        outputs = [ir.Value(name=self.fresh(f"{hint}_{i}")) for i in range(count)]
        return list(self._tape.op_multi_out(op_type, inputs, attrs, name=self.fresh(f"node:{hint}"), outputs=outputs))

    def copy(self, node: ir.Node, inputs: Sequence[ir.Value | None]) -> Sequence[ir.Value]:
        """Append a copy of an original node reading ``inputs``; its outputs keep their names (and the
        node its doc string and metadata)."""
        attrs = {name: _copy_attr(a) for name, a in node.attributes.items()}
        outputs = [ir.Value(name=out.name) for out in node.outputs]
        self._used.update(out.name for out in node.outputs if out.name)
        return self._tape.op_multi_out(node.op_type, inputs, attrs, domain=node.domain, overload=node.overload,
                                       version=node.version, name=self.fresh(f"node:{node.name or node.op_type}"),
                                       doc_string=node.doc_string, metadata_props=dict(node.metadata_props),
                                       outputs=outputs)

    def const(self, array: np.ndarray, hint: str) -> ir.Value:
        """A new constant (an initializer, stored with the weights)."""
        name = self.fresh(self._const_prefix + hint)
        return self._tape.initializer(ir.tensor(np.asarray(array, order="C"), name=name), name=name)

    def initializer(self, original: ir.Value) -> ir.Value:
        """This graph's copy of an initializer of another graph (the tensor is shared, not copied)."""
        if original.name not in self._initializers:
            assert original.const_value is not None and original.name is not None
            self._initializers[original.name] = self._tape.initializer(original.const_value, name=original.name)
        return self._initializers[original.name]

    def input(self, name: str, dtype: ir.DataType, shape: Sequence[int | str]) -> ir.Value:
        """The graph input called ``name`` (declared on first use)."""
        if name not in self._inputs:
            value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))
            self.graph.inputs.append(value)
            self._inputs[name] = value
            self._used.add(name)
        return self._inputs[name]

    def output(self, value: ir.Value, dtype: ir.DataType, shape: Sequence[int | str]) -> None:
        """Declare ``value`` a graph output of the given type."""
        value.dtype = dtype
        value.shape = ir.Shape(list(shape))
        self.graph.outputs.append(value)


def _copy_attr(attr: ir.Attr) -> ir.Attr:
    """An attribute for a node of another graph (subgraphs are cloned, other values are immutable)."""
    if attr.type == ir.AttributeType.GRAPH:
        return ir.Attr(attr.name, attr.type, attr.as_graph().clone(allow_outer_scope_values=True))
    if attr.type == ir.AttributeType.GRAPHS:
        return ir.Attr(attr.name, attr.type, [g.clone(allow_outer_scope_values=True) for g in attr.as_graphs()])
    return attr


def sparse_graph(opset_imports: dict[str, int]) -> ir.Graph:
    """An empty SPARSE graph importing the model's opsets and ``ai.sigec``."""
    imports = {domain: version for domain, version in opset_imports.items() if domain != SIGEC_DOMAIN}
    imports[SIGEC_DOMAIN] = SIGEC_OPSET
    return ir.Graph([], [], nodes=[], opset_imports=imports, name="sigec_sparse")
