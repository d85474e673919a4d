"""The Attention operator of opset 23 is written as MatMul / Softmax / MatMul by the frontend, so the
token rules run it on the active queries; checked against ONNX Runtime running the operator itself."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import always_sparse, assert_exact, compare_with_oracle, engine_from_proto, ort_oracle
from sigec.core.errors import CompileError
from sigec.frontends.onnx_frontend import load_onnx

B, C, S, HEADS, L = 2, 8, 8, 2, 5


def _model(four_d: bool, **attention_attrs) -> onnx.ModelProto:
    """conv -> tokens [B, S*S, C] -> Attention(q = tokens, k = v = context) -> map -> conv."""
    rng = np.random.default_rng(0)
    init = [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in {
        "w_in": rng.standard_normal((C, 3, 3, 3)).astype(np.float32) * 0.3,
        "w_out": rng.standard_normal((3, C, 3, 3)).astype(np.float32) * 0.3,
        "wq": rng.standard_normal((C, C)).astype(np.float32) * 0.3,
        "wk": rng.standard_normal((C, C)).astype(np.float32) * 0.3}.items()]
    shapes = {"to_tokens": [B, S * S, C], "heads": [B, S * S, HEADS, C // HEADS], "ctx_heads": [B, L, HEADS, C // HEADS],
              "to_map": [B, S, S, C]}
    init += [helper.make_tensor(n, TensorProto.INT64, [len(v)], v) for n, v in shapes.items()]
    nodes = [helper.make_node("Conv", ["image", "w_in"], ["x"], pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["xt", "to_tokens"], ["tokens"]),
             helper.make_node("MatMul", ["tokens", "wq"], ["q"]),
             helper.make_node("MatMul", ["context", "wk"], ["k"])]
    if four_d:
        nodes += [helper.make_node("Reshape", ["q", "heads"], ["q4"]),
                  helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["k", "ctx_heads"], ["k4"]),
                  helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3]),
                  helper.make_node("Attention", ["qh", "kh", "kh"], ["yh"], **attention_attrs),
                  helper.make_node("Transpose", ["yh"], ["y4"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["y4", "to_tokens"], ["y"])]
    else:
        nodes.append(helper.make_node("Attention", ["q", "k", "k"], ["y"], q_num_heads=HEADS, kv_num_heads=HEADS,
                                      **attention_attrs))
    nodes += [helper.make_node("Reshape", ["y", "to_map"], ["ym"]),
              helper.make_node("Transpose", ["ym"], ["m"], perm=[0, 3, 1, 2]),
              helper.make_node("Conv", ["m", "w_out"], ["out"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "attention23", [
        helper.make_tensor_value_info("image", TensorProto.FLOAT, [B, 3, S, S]),
        helper.make_tensor_value_info("context", TensorProto.FLOAT, [B, L, C])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, 3, S, S])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"image": rng.standard_normal((B, 3, S, S)).astype(np.float32),
            "context": rng.standard_normal((B, L, C)).astype(np.float32)}


@pytest.mark.parametrize("four_d", [False, True])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_attention_operator_runs_on_the_active_queries(four_d: bool, scale: float | None) -> None:
    proto = _model(four_d, **({"scale": scale} if scale is not None else {}))
    canonical = load_onnx(proto)
    assert "Attention" not in {n.op_type for n in canonical.graph}
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=4, backend="ort"))
    kinds = Counter((n["op_type"], n["kind"]) for n in engine.manifest["nodes"])
    assert kinds[("Softmax", "sparse")] == 1 and not [k for k in kinds if k[1] == "dense"], kinds
    inputs = _inputs()
    edited = {k: v.copy() for k, v in inputs.items()}
    edited["image"][:, :, 1:3, 5:7] += 1.0
    assert_exact(compare_with_oracle(engine, ort_oracle(proto), inputs, edited))


@pytest.mark.parametrize("attrs, what", [({"is_causal": 1}, "is_causal"), ({"softcap": 5.0}, "softcap")])
def test_unsupported_attention_variants_name_the_node(attrs: dict, what: str) -> None:
    with pytest.raises(CompileError, match=f"Attention node .*{what}"):
        load_onnx(_model(False, **attrs))
