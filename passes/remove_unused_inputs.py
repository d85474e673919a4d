"""Drop the graph inputs nothing reads any more."""

from __future__ import annotations

from typing import Iterable

import onnx_ir as ir


class RemoveUnusedInputsPass(ir.passes.InPlacePass):
    """Remove graph inputs that no node reads and that are not graph outputs.

    Run after ``RemoveUnusedNodesPass`` on the SPARSE graph: caches and tile indices declared for
    nodes that turned out dead (a gather whose view was fused away, a declined rule's nodes) are
    then not fed by the engine.

    Rules:
    1. An input with no use that is not a graph output is removed, unless its name is in ``keep``
       (the model's spatial inputs: the engine feeds them whatever the graph reads).
    2. Every other input stays, in its order.
    """

    def __init__(self, keep: Iterable[str] = ()) -> None:
        super().__init__()
        self.keep = frozenset(keep)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        inputs = model.graph.inputs
        modified = False
        for i in reversed(range(len(inputs))):
            value = inputs[i]
            if not value.uses() and not value.is_graph_output() and value.name not in self.keep:
                inputs.pop(i)
                modified = True
        return ir.passes.PassResult(model, modified)
