"""Non-spatial inputs (a timestep, a style vector) are cached per key and must match the primed value."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import sigec
from helpers import always_sparse, engine_from_proto, ort_oracle, rel_err


def _model():
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "t"], ["a"]),  # the graph input used directly
             helper.make_node("Mul", ["t", "two"], ["t2"]),
             helper.make_node("Mul", ["a", "t2"], ["m"]),
             helper.make_node("Conv", ["m", "w2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 16, 16]),
                                           helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 3, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 16, 16])],
                              initializer=[onnx.numpy_helper.from_array(rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "w"),
                                           onnx.numpy_helper.from_array(rng.standard_normal((2, 3, 3, 3)).astype(np.float32), "w2"),
                                           onnx.numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_static_input_used_directly_and_keys_per_value(backend):
    model = _model()
    oracle = ort_oracle(model)
    engine = always_sparse(engine_from_proto(model, mode="exact", backend=backend))
    assert {c["kind"] for c in engine.manifest["caches"]} >= {"static"}
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 2, 16, 16)).astype(np.float32)
    t0, t1 = (rng.standard_normal((1, 3, 1, 1)).astype(np.float32) for _ in range(2))
    engine.prime({"x": x, "t": t0}, key=0)
    engine.prime({"x": x, "t": t1}, key=1)
    x2 = x.copy()
    x2[..., 3:5, 7:9] += 1
    for key, t in ((0, t0), (1, t1)):
        sparse = engine.run({"x": x2, "t": t}, key=key)[0]
        assert engine.stats.path == "sparse"
        expected = oracle({"x": x2, "t": t})[0]
        assert rel_err(oracle({"x": x, "t": t})[0], expected) > 1e-2  # the edit changes the output
        assert rel_err(sparse, expected) <= 1e-5
        assert rel_err(engine.run_dense({"x": x2, "t": t})[0], expected) <= 1e-5
    with pytest.raises(sigec.InputError, match="'t'"):
        engine.run({"x": x2, "t": t1}, key=0)
