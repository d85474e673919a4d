"""Nearest Resize up- and downscales in every coordinate mode: sparse where the geometry is integer, exact always."""

import numpy as np
import onnx
import pytest
from onnx import helper

from helpers import engine_from_proto, rel_err

CASES = [("asymmetric", "floor", 32, 8), ("asymmetric", "floor", 8, 32), ("half_pixel", "round_prefer_floor", 30, 10),
         ("pytorch_half_pixel", "round_prefer_ceil", 9, 18), ("half_pixel", "floor", 8, 32),
         ("align_corners", "round_prefer_floor", 32, 16)]
SPARSE_EXPECTED = {("half_pixel", "floor", 8, 32): False, ("align_corners", "round_prefer_floor", 32, 16): False}


@pytest.mark.parametrize("ctm,nearest_mode,size_in,size_out", CASES)
def test_nearest_resize_is_exact(ctm, nearest_mode, size_in, size_out):
    rng = np.random.default_rng(size_in * 100 + size_out)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "", "sizes"], ["r"], mode="nearest",
                              coordinate_transformation_mode=ctm, nearest_mode=nearest_mode),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "w2"),
             onnx.numpy_helper.from_array(np.array([1, 2, size_out, size_out], np.int64), "sizes")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 2, size_in, size_in])],
                              [helper.make_tensor_value_info("y", 1, [1, 2, size_out, size_out])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    engine = engine_from_proto(model, mode="exact", fallback="dense", backend="ort")
    resize = next(n for n in engine.manifest["nodes"] if n["op_type"] == "Resize")
    assert (resize["kind"] == "sparse") == SPARSE_EXPECTED.get((ctm, nearest_mode, size_in, size_out), True)
    x0 = rng.standard_normal((1, 2, size_in, size_in)).astype(np.float32)
    engine.prime({"x": x0})
    for _ in range(3):
        x1 = x0.copy()
        y, x = rng.integers(0, size_in, 2)
        x1[..., y, x] += 1.0
        assert rel_err(engine.run({"x": x1})[0], engine.run_dense({"x": x1})[0]) <= 1e-5
