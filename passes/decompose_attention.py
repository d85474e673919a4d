"""Rewrite the ``Attention`` operator (opset 23) as the MatMul / Mul / Softmax / MatMul chain that
exporters write at opset 18, so that the token rules see one spelling of attention."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from sigec.core.errors import CompileError
from sigec.passes._ir_utils import attr, make_initializer, static_shape

UNSUPPORTED_INPUTS = ("attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")


class DecomposeAttentionPass(ir.passes.InPlacePass):
    """Replace every ``Attention`` node by standard ops computing the same output ``Y``.

    Rules:
    1. Inputs Q, K, V as ``[B, heads, S, d]`` (4-D), or ``[B, S, heads * d]`` (3-D) with
       ``q_num_heads`` = ``kv_num_heads``: Q @ K^T * scale (default ``1 / sqrt(d)``), Softmax over the
       keys, @ V; 3-D inputs are split into heads and the result merged back.
    2. A mask, past keys/values, causal masking, a soft cap, a nonzero ``qk_matmul_output_mode``,
       grouped keys (fewer key heads) or a used second to fourth output raise CompileError naming
       the node: sigec does not decompose those.
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for node in list(model.graph):
            if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
                _decompose(model.graph, node)
                modified = True
        return ir.passes.PassResult(model, modified)


def _check(node: ir.Node) -> None:
    for name, value in zip(("Q", "K", "V", *UNSUPPORTED_INPUTS), node.inputs):
        if name in UNSUPPORTED_INPUTS and value is not None:
            raise CompileError(f"Attention node '{node.name}': input {name} is not supported")
    for name in ("is_causal", "qk_matmul_output_mode"):
        if int(attr(node, name, 0)):
            raise CompileError(f"Attention node '{node.name}': {name}={attr(node, name)} is not supported")
    if float(attr(node, "softcap", 0.0)):
        raise CompileError(f"Attention node '{node.name}': softcap is not supported")
    if any(out.uses() or out.is_graph_output() for out in node.outputs[1:]):
        raise CompileError(f"Attention node '{node.name}': only its first output may be used")


def _decompose(graph: ir.Graph, node: ir.Node) -> None:
    _check(node)
    q, k, v = node.inputs[:3]
    shapes = [static_shape(x) for x in (q, k, v)]
    if any(s is None or len(s) not in (3, 4) for s in shapes) or len({len(s) for s in shapes}) != 1:  # type: ignore[arg-type]
        raise CompileError(f"Attention node '{node.name}': Q, K and V need static 3-D or 4-D shapes, got {shapes}")
    tape = ir.tape.Tape(graph)
    prefix = node.name or "attention"
    const = lambda array, hint: make_initializer(graph, f"{prefix}/{hint}", array)  # noqa: E731
    if len(shapes[0]) == 3:  # type: ignore[arg-type]
        heads = int(attr(node, "q_num_heads", 0))
        if heads < 1 or int(attr(node, "kv_num_heads", heads)) != heads:
            raise CompileError(f"Attention node '{node.name}': 3-D inputs need q_num_heads = kv_num_heads")
        batch = shapes[0][0]  # type: ignore[index]

        def split(x: ir.Value, shape: tuple[int, ...], perm: list[int], hint: str) -> ir.Value:
            dims = np.array([batch, shape[1], heads, shape[2] // heads], np.int64)
            return tape.op("Transpose", [tape.op("Reshape", [x, const(dims, f"{hint}_heads")])],
                           attributes={"perm": perm})

        qh = split(q, shapes[0], [0, 2, 1, 3], "q")  # type: ignore[arg-type]
        kt = split(k, shapes[1], [0, 2, 3, 1], "k")  # type: ignore[arg-type]
        vh = split(v, shapes[2], [0, 2, 1, 3], "v")  # type: ignore[arg-type]
        head_dim = shapes[0][2] // heads  # type: ignore[index]
    else:
        if shapes[0][1] != shapes[1][1]:  # type: ignore[index]
            raise CompileError(f"Attention node '{node.name}': grouped key heads are not supported")
        qh, vh = q, v
        kt = tape.op("Transpose", [k], attributes={"perm": [0, 1, 3, 2]})
        head_dim = shapes[0][3]  # type: ignore[index]
    scale = attr(node, "scale", None)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
    dtype = q.dtype.numpy() if q.dtype is not None else np.float32
    scores = tape.op("Mul", [tape.op("MatMul", [qh, kt]), const(np.array(scale, dtype), "scale")])
    out = tape.op("MatMul", [tape.op("Softmax", [scores], attributes={"axis": -1}), vh])
    if len(shapes[0]) == 3:  # type: ignore[arg-type]
        merged = np.array([batch, shapes[0][1], -1], np.int64)  # type: ignore[index]
        out = tape.op("Reshape", [tape.op("Transpose", [out], attributes={"perm": [0, 2, 1, 3]}),
                                  const(merged, "merged")])
    for i, n in enumerate(tape.nodes):  # appended at the end; the canonicaliser sorts the graph afterwards
        n.name = f"{prefix}/{n.op_type}_{i}"
    y = node.outputs[0]
    if y.is_graph_output():
        graph.outputs[graph.outputs.index(y)] = out
    y.replace_all_uses_with(out)
    name = y.name
    graph.remove(node, safe=True)
    out.name = name
