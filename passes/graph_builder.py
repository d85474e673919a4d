"""A small builder for the ONNX graphs sigec emits (FULL additions and the SPARSE graph)."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from sigec.core.ops import DOMAIN

SIGEC_DOMAIN = DOMAIN
SIGEC_OPSET = 1


class GraphBuilder:
    """Accumulates nodes, inputs, outputs and constants with unique tensor names."""

    def __init__(self, reserved_names: Iterable[str] = ()) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.constants: dict[str, np.ndarray] = {}
        self._used: set[str] = set(reserved_names)
        self._input_names: set[str] = set()
        self._counter = 0

    def fresh(self, hint: str) -> str:
        """A tensor or node name not used before, derived from ``hint``."""
        name = hint
        while name in self._used:
            self._counter += 1
            name = f"{hint}__{self._counter}"
        self._used.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Mark an exact name as used (it must be free) and return it."""
        self._used.add(name)
        return name

    def node(self, op_type: str, inputs: Sequence[str | None], *, hint: str, n_outputs: int = 1,
             outputs: Sequence[str] | None = None, domain: str = "", **attributes: Any) -> list[str]:
        """Append a node; return its output names (fresh names from ``hint`` unless given)."""
        outs = list(outputs) if outputs is not None else [self.fresh(f"{hint}" if n_outputs == 1 else f"{hint}:{i}")
                                                           for i in range(n_outputs)]
        attrs = {k: v for k, v in attributes.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, ["" if i is None else i for i in inputs], outs,
                                           name=self.fresh(f"node:{hint}"), domain=domain, **attrs))
        return outs

    def node1(self, op_type: str, inputs: Sequence[str | None], *, hint: str, domain: str = "", **attributes: Any) -> str:
        """Append a single-output node and return the output name."""
        return self.node(op_type, inputs, hint=hint, domain=domain, **attributes)[0]

    def const(self, array: np.ndarray, hint: str) -> str:
        """Add a constant tensor (stored with the weights) and return its name."""
        name = self.fresh(hint)
        self.constants[name] = np.asarray(array, order="C")
        return name

    def add_input(self, name: str, elem_type: int, shape: Sequence[int | str]) -> str:
        """Declare a graph input (once per name)."""
        if name not in self._input_names:
            self._input_names.add(name)
            self._used.add(name)
            self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def add_output(self, name: str, elem_type: int, shape: Sequence[int | str] | None) -> None:
        """Declare a graph output."""
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, None if shape is None else list(shape)))


def make_model(graph_name: str, nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
               outputs: Sequence[onnx.ValueInfoProto], initializers: Mapping[str, np.ndarray],
               opset_imports: Sequence[onnx.OperatorSetIdProto], *, with_sigec: bool) -> onnx.ModelProto:
    """Assemble a ModelProto (initializers given as arrays are embedded)."""
    graph = helper.make_graph(list(nodes), graph_name, list(inputs), list(outputs),
                              initializer=[onnx.numpy_helper.from_array(np.asarray(a), name=n)
                                           for n, a in initializers.items()])
    imports = [op for op in opset_imports if op.domain != SIGEC_DOMAIN]
    if with_sigec:
        imports.append(helper.make_opsetid(SIGEC_DOMAIN, SIGEC_OPSET))
    model = helper.make_model(graph, opset_imports=imports, producer_name="sigec")
    model.ir_version = 10
    return model
