"""Resize between two convolutions, in every coordinate mode, against the original model run by
ONNX Runtime: nearest up- and downscales are sparse where the geometry is an integer factor
(otherwise kept dense by fallback="dense"), linear half-pixel upscales are sparse; every edit runs
on the sparse path (forced) and is exact, and most edits change the output (so not recomputing
would fail).

This supersedes test_resize_rules.py, whose runs took the dense fallback on most edits."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers import EXACT_TOLERANCE, always_sparse, assert_exact, compare_with_oracle, engine_from_proto, ort_oracle

# (mode, coordinate transformation, nearest mode, input size, output size, sparse)
CASES = [
    ("nearest", "asymmetric", "floor", 32, 8, True),
    ("nearest", "asymmetric", "floor", 8, 32, True),
    ("nearest", "half_pixel", "round_prefer_floor", 30, 10, True),
    ("nearest", "pytorch_half_pixel", "round_prefer_ceil", 9, 18, True),
    ("nearest", "half_pixel", "floor", 8, 32, False),  # reads 0, 0, 0, 1, ...: not an integer upscale
    ("nearest", "align_corners", "round_prefer_floor", 32, 16, False),
    ("linear", "half_pixel", "", 8, 16, True),
    ("linear", "half_pixel", "", 12, 24, True),
]


def _model(mode: str, ctm: str, nearest_mode: str, size_in: int, size_out: int) -> onnx.ModelProto:
    rng = np.random.default_rng(size_in * 100 + size_out)
    attrs = {"mode": mode, "coordinate_transformation_mode": ctm}
    if nearest_mode:
        attrs["nearest_mode"] = nearest_mode
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "", "sizes"], ["r"], **attrs),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(rng.standard_normal((2, 2, 3, 3)).astype(np.float32), "w2"),
             onnx.numpy_helper.from_array(np.array([1, 2, size_out, size_out], np.int64), "sizes")]
    graph = helper.make_graph(nodes, "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, size_in, size_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, size_out, size_out])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


@pytest.mark.parametrize("mode,ctm,nearest_mode,size_in,size_out,sparse", CASES)
def test_resize_is_exact_on_the_sparse_path(mode, ctm, nearest_mode, size_in, size_out, sparse):
    proto = _model(mode, ctm, nearest_mode, size_in, size_out)
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=4, fallback="dense", backend="ort"))
    resize = next(n for n in engine.manifest["nodes"] if n["op_type"] == "Resize")
    assert (resize["kind"] == "sparse") == sparse
    oracle = ort_oracle(proto)
    rng = np.random.default_rng(size_in * 100 + size_out)
    x0 = rng.standard_normal((1, 2, size_in, size_in)).astype(np.float32)
    changed = 0
    for y, x in [(0, 0), (size_in - 1, size_in - 1), *rng.integers(0, size_in, (4, 2))]:
        x1 = x0.copy()
        x1[..., y, x] += 1.0
        result = compare_with_oracle(engine, oracle, {"x": x0}, {"x": x1})
        assert_exact(result, min_change=0.0, context=f"pixel ({y}, {x})")
        changed += result.stale > 100 * EXACT_TOLERANCE
    # A downscale skips most pixels; at least the corner (sampled in every mode) and some others reach the output.
    assert changed >= 2, f"only {changed} of 6 one-pixel edits changed the output"
