"""The ONNX frontend on models as they come from the wild: unnamed nodes get names."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import sigec
from helpers import rel_err


def _unnamed_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 24, 24])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((3, 4, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], pads=[1, 1, 1, 1]),  # no names: legal ONNX
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "w2"], ["y"], pads=[1, 1, 1, 1])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, w2]),
                             opset_imports=[helper.make_opsetid("", 18)])


def test_unnamed_nodes_are_named_and_the_engine_matches_onnxruntime(tmp_path):
    model = _unnamed_model()
    onnx.save(model, tmp_path / "m.onnx")
    engine = sigec.load(sigec.compile(tmp_path / "m.onnx", tmp_path / "m.sigec", mode="exact"))
    names = [n.get("name") for n in engine.manifest["nodes"]]
    assert all(names) and len(set(names)) == len(names), names
    engine.dense_fallback_fraction = float("inf")
    x0 = np.random.default_rng(1).standard_normal((1, 3, 24, 24)).astype(np.float32)
    primed = engine.prime({"x": x0})[0]
    x1 = x0.copy()
    x1[..., 4:7, 4:7] += 1.0
    sparse = engine.run({"x": x1})[0]
    assert engine.stats.path == "sparse"
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x1})[0]
    assert rel_err(primed, expected) > 1e-2
    assert rel_err(sparse, expected) <= 1e-5
