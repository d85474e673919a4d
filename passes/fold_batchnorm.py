"""Fold inference ``BatchNormalization`` into the preceding ``Conv``."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sigec.passes._ir_utils import attr, const_array, make_initializer


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold ``Conv -> BatchNormalization`` pairs into one ``Conv``.

    Rewrite rules:
    1. ``BatchNormalization(Conv(x, W, b), scale, bias, mean, var)`` with constant parameters and a
       Conv whose output has no other consumer becomes ``Conv(x, W', b')`` with
       ``W' = W * s[:, None, None, None]``, ``b' = (b - mean) * s + bias``, ``s = scale / sqrt(var + eps)``.
    2. BatchNormalization nodes that cannot be folded stay (the sparse rewrite treats them as
       per-channel affine ops).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "BatchNormalization" and node.domain == "":
                modified |= _fold_one(model.graph, node)
        return ir.passes.PassResult(model, modified)


def _fold_one(graph: ir.Graph, bn: ir.Node) -> bool:
    conv = bn.inputs[0].producer() if bn.inputs[0] is not None else None
    if conv is None or conv.op_type != "Conv" or conv.domain != "":
        return False
    conv_out = conv.outputs[0]
    if len(conv_out.uses()) != 1 or conv_out.is_graph_output() or len(bn.outputs) > 1 and any(
            o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return False
    params = [const_array(v) for v in bn.inputs[1:5]]
    weight = const_array(conv.inputs[1])
    if weight is None or any(p is None for p in params):
        return False
    scale, bias, mean, var = (p.astype(np.float64) for p in params)
    eps = float(attr(bn, "epsilon", 1e-5))
    s = scale / np.sqrt(var + eps)
    conv_bias = const_array(conv.inputs[2]) if len(conv.inputs) > 2 and conv.inputs[2] is not None else None
    b = conv_bias.astype(np.float64) if conv_bias is not None else np.zeros_like(mean)
    new_w = (weight.astype(np.float64) * s.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
    new_b = ((b - mean) * s + bias).astype(weight.dtype)
    w_val = make_initializer(graph, (conv.inputs[1].name or "w") + "_bnfold", new_w)
    b_val = make_initializer(graph, (conv.inputs[1].name or "w") + "_bnfold_bias", new_b)
    conv.replace_input_with(1, w_val)
    if len(conv.inputs) > 2:
        conv.replace_input_with(2, b_val)
    else:
        conv.resize_inputs(3)
        conv.replace_input_with(2, b_val)
    out_name = bn.outputs[0].name
    was_output = bn.outputs[0].is_graph_output()
    bn.outputs[0].replace_all_uses_with(conv_out, replace_graph_outputs=True)
    graph.remove(bn, safe=True)
    if was_output:
        conv_out.name = out_name
    return True
