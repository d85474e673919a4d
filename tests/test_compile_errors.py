"""Compile errors name what is wrong; --fallback dense keeps unsupported nodes dense."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sigec
from helpers import always_sparse, assert_exact, compare_with_oracle, engine_from_proto, ort_oracle


def _model_with_unsupported_op():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv_in", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("ReduceL1", ["c", "axes"], ["n"], name="weird_norm", keepdims=1),
        helper.make_node("Conv", ["n", "w2"], ["y"], name="conv_out", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    rng = np.random.default_rng(0)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 12, 12])],
                              initializer=[onnx.numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "w"),
                                           onnx.numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3)).astype(np.float32), "w2"),
                                           onnx.numpy_helper.from_array(np.array([1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def test_unsupported_node_is_named(tmp_path):
    with pytest.raises(sigec.CompileError, match=r"'weird_norm' \(ReduceL1\)"):
        sigec.compile(_model_with_unsupported_op(), tmp_path / "e.sigec", mode="exact")


def test_fallback_dense_keeps_it_dense_and_stays_exact():
    """The sparse graph (forced: the dense island makes most of the model dense) computes the node
    without a rule densely and equals the original model."""
    model = _model_with_unsupported_op()
    engine = always_sparse(engine_from_proto(model, mode="exact", fallback="dense"))
    kinds = {n["name"]: n["kind"] for n in engine.manifest["nodes"]}
    assert kinds["weird_norm"] == "dense" and kinds["conv_in"] == "sparse"
    x = np.random.default_rng(1).standard_normal((1, 2, 12, 12)).astype(np.float32)
    y = x.copy()
    y[..., 0, 0] += 1
    assert_exact(compare_with_oracle(engine, ort_oracle(model), {"x": x}, {"x": y}), context="fallback='dense'")


def test_dynamic_input_needs_a_pinned_shape(tmp_path):
    model = _model_with_unsupported_op()
    dim = model.graph.input[0].type.tensor_type.shape.dim[2]
    dim.Clear()
    dim.dim_param = "height"
    with pytest.raises(sigec.CompileError, match="input 'x' has a dynamic shape.*--input-shape x="):
        sigec.compile(model, tmp_path / "e.sigec", fallback="dense")
    with pytest.raises(sigec.CompileError, match="not a model input"):
        sigec.compile(model, tmp_path / "e.sigec", fallback="dense", input_shapes={"y": (1, 2, 12, 12)})


def test_model_without_spatial_input_is_refused(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["v"], ["o"])], "g",
                              [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(sigec.CompileError, match="no spatial input"):
        sigec.compile(model, tmp_path / "e.sigec")


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(sigec.CompileError, match="mode"):
        sigec.compile(_model_with_unsupported_op(), tmp_path / "e.sigec", mode="fast")
    with pytest.raises(sigec.CompileError, match="tile size"):
        sigec.compile(_model_with_unsupported_op(), tmp_path / "e.sigec", tile_size=0, fallback="dense")
