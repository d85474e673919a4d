"""Multiply-accumulate counts of the compute-heavy ONNX ops (for reports and cost estimates)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sigec.passes._ir_utils import attr, static_shape


def dense_macs(node: ir.Node) -> int:
    """MACs of one dense execution of ``node`` (0 for ops that are not matrix or conv products)."""
    try:
        if node.op_type == "Conv":
            out, w = static_shape(node.outputs[0]), static_shape(node.inputs[1])
            return int(np.prod(out)) * int(np.prod(w[1:]))
        if node.op_type == "ConvTranspose":
            x, w = static_shape(node.inputs[0]), static_shape(node.inputs[1])
            return int(np.prod(x)) * int(np.prod(w[1:]))
        if node.op_type == "MatMul":
            a, out = static_shape(node.inputs[0]), static_shape(node.outputs[0])
            return int(np.prod(out)) * int(a[-1])
        if node.op_type == "Gemm":
            a, out = static_shape(node.inputs[0]), static_shape(node.outputs[0])
            k = a[0] if attr(node, "transA", 0) else a[-1]
            return int(np.prod(out)) * int(k)
    except (TypeError, IndexError):
        return 0
    return 0
