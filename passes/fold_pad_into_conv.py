"""Fold a zero ``Pad`` in front of a ``Conv`` into the convolution's own padding."""

from __future__ import annotations

import onnx_ir as ir

from sigec.passes._ir_utils import attr, const_array


class FoldPadIntoConvPass(ir.passes.InPlacePass):
    """Remove constant-zero spatial ``Pad`` nodes whose only consumers are convolutions.

    Rewrite rules:
    1. ``Pad(x, pads, value=0, mode="constant") -> Conv`` where the pad touches only the two spatial
       axes of an NCHW tensor, becomes ``Conv(x)`` with ``pads`` increased by the Pad's amounts.
    2. The Pad is kept if any consumer is not a ``Conv`` with ``auto_pad`` NOTSET, if the pad is
       negative, or if the pad value is not zero (reflect/edge pads are handled by the sparse
       rewrite, which folds them into the tile gather instead).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "Pad" and node.domain == "":
                modified |= _fold_one(node)
        return ir.passes.PassResult(model, modified)


def _spatial_zero_pads(node: ir.Node) -> list[int] | None:
    """The [top, left, bottom, right] amounts of a zero Pad on an NCHW tensor, or None."""
    if (attr(node, "mode", "constant") or "constant") != "constant":
        return None
    pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None or pads.size != 8 or len(node.inputs) > 3 and node.inputs[3] is not None:
        return None
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        value = const_array(node.inputs[2])
        if value is None or value.size != 1 or float(value.reshape(-1)[0]) != 0.0:
            return None
    p = [int(v) for v in pads.tolist()]
    if p[0] or p[1] or p[4] or p[5] or min(p) < 0:
        return None
    return [p[2], p[3], p[6], p[7]]


def _fold_one(pad: ir.Node) -> bool:
    amounts = _spatial_zero_pads(pad)
    out = pad.outputs[0]
    if amounts is None or out.is_graph_output():
        return False
    consumers = [use.node for use in out.uses()]
    if not consumers or any(c.op_type != "Conv" or c.domain != "" or use.idx != 0
                            or (attr(c, "auto_pad", "NOTSET") or "NOTSET") != "NOTSET"
                            for c, use in zip(consumers, out.uses())):
        return False
    for conv in consumers:
        old = attr(conv, "pads") or [0, 0, 0, 0]
        new = [old[0] + amounts[0], old[1] + amounts[1], old[2] + amounts[2], old[3] + amounts[3]]
        conv.attributes["pads"] = ir.AttrInt64s("pads", new)
        conv.replace_input_with(0, pad.inputs[0])
    pad.graph.remove(pad, safe=True)
    return True
