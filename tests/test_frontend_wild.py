"""The ONNX frontend on models as old and odd as they come from packages: an old opset, shapes onnx
cannot infer, 5-D convolutions over a depth-1 axis, and failures that name their node.

Every engine is compiled from the file (as ``sigec compile`` does) and compared with the original
model run by ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sigec
from helpers import always_sparse, assert_approx, assert_exact, compare_with_oracle, ort_oracle
from sigec.cli import main
from sigec.frontends.onnx_frontend import load_onnx
from sigec.passes._ir_utils import static_shape

SHAPE = (1, 3, 32, 32)


def _weights(rng: np.random.Generator, name: str, *shape: int, scale: float = 0.3) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], opset: int, *, dynamic: bool = False,
           extra_opsets: tuple[tuple[str, int], ...] = ()) -> onnx.ModelProto:
    dims = ["N", 3, "H", "W"] if dynamic else list(SHAPE)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] + [
        helper.make_opsetid(d, v) for d, v in extra_opsets])
    model.ir_version = 5 if opset <= 10 else 8
    return model


def _opset10_crop_model() -> onnx.ModelProto:
    """Opset 10, dynamic input: down, up (34x34), crop to the input's size, two more layers.

    The crop's ``ends`` come from ``Gather(Shape(x))``; constant folding turns them into a
    ``Constant(value_ints)`` node, which opset 10 does not have, so onnx's shape inference of the
    unconverted model fails and the Slice's output shape stays open."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="Conv_1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="Relu_2"),
             helper.make_node("ConvTranspose", ["r1", "wt"], ["up"], name="ConvTranspose_3", strides=[2, 2]),
             helper.make_node("Shape", ["x"], ["s"], name="Shape_28"),
             helper.make_node("Gather", ["s", "hw_axes"], ["hw"], name="Gather_29", axis=0),
             helper.make_node("Slice", ["up", "zeros", "hw", "hw_axes"], ["crop"], name="Slice_30"),
             helper.make_node("Relu", ["crop"], ["r2"], name="Relu_31"),
             helper.make_node("Conv", ["r2", "w2"], ["y"], name="Conv_32", pads=[1, 1, 1, 1])]
    inits = [_weights(rng, "w1", 8, 3, 3, 3), _weights(rng, "wt", 8, 6, 4, 4), _weights(rng, "w2", 3, 6, 3, 3),
             _ints("hw_axes", [2, 3]), _ints("zeros", [0, 0])]
    return _model(nodes, inits, 10, dynamic=True)


def _depth1_conv_model() -> onnx.ModelProto:
    """Opset 12: a 5-D encoder-decoder over a time axis of 1 (Conv3d kernels 1 x k x k), entered by
    Unsqueeze and left by Transpose + Reshape, as exporters of video models write it."""
    rng = np.random.default_rng(1)
    c = 6
    nodes = [helper.make_node("Unsqueeze", ["x"], ["x5"], name="Unsqueeze_0", axes=[2]),
             helper.make_node("Conv", ["x5", "w1", "b1"], ["c1"], name="Conv_1", kernel_shape=[1, 3, 3],
                              pads=[0, 1, 1, 0, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], ["n1"], name="BN_2"),
             helper.make_node("Relu", ["n1"], ["r1"], name="Relu_3"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="Conv_4", kernel_shape=[1, 3, 3],
                              pads=[0, 1, 1, 0, 1, 1]),
             helper.make_node("LeakyRelu", ["c2"], ["r2"], name="LeakyRelu_5", alpha=0.1),
             helper.make_node("MaxPool", ["r2"], ["p2"], name="MaxPool_6", kernel_shape=[1, 2, 2], strides=[1, 2, 2]),
             helper.make_node("ConvTranspose", ["p2", "wt"], ["up"], name="ConvTranspose_7", kernel_shape=[1, 2, 2],
                              strides=[1, 2, 2]),
             helper.make_node("Mul", ["up", "gain"], ["g"], name="Mul_8"),
             helper.make_node("Concat", ["g", "r1"], ["cat"], name="Concat_9", axis=1),
             helper.make_node("Conv", ["cat", "w3"], ["c3"], name="Conv_10", kernel_shape=[1, 1, 1]),
             helper.make_node("Transpose", ["c3"], ["t"], name="Transpose_11", perm=[0, 2, 1, 3, 4]),
             helper.make_node("Reshape", ["t", "shape4"], ["y"], name="Reshape_12")]
    inits = [_weights(rng, "w1", c, 3, 1, 3, 3), _weights(rng, "b1", c, scale=0.1), _weights(rng, "w2", c, c, 1, 3, 3),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn_s"),
             _weights(rng, "bn_b", c, scale=0.1), _weights(rng, "bn_m", c, scale=0.1),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, c).astype(np.float32), "bn_v"),
             _weights(rng, "wt", c, c, 1, 2, 2), _weights(rng, "gain", c, 1, 1, 1, scale=1.0),
             _weights(rng, "w3", 3, 2 * c, 1, 1, 1), _ints("shape4", [1, 3, 32, 32])]
    return _model(nodes, inits, 12)


def _edit(seed: int = 2) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal(SHAPE).astype(np.float32)
    x1 = x0.copy()
    x1[..., 10:15, 12:18] += rng.standard_normal((1, 3, 5, 6)).astype(np.float32)
    mask = np.zeros(SHAPE[2:], bool)
    mask[10:15, 12:18] = True
    return {"x": x0}, {"x": x1}, mask


def test_old_opset_with_a_crop_onnx_cannot_infer_compiles_and_matches_onnxruntime(tmp_path, capfd):
    model = _opset10_crop_model()
    onnx.save(model, tmp_path / "crop10.onnx")
    canonical = load_onnx(tmp_path / "crop10.onnx", {"x": SHAPE})
    assert canonical.opset_imports[""] == 18
    assert static_shape(next(n for n in canonical.graph if n.name == "Slice_30").outputs[0]) == (1, 6, 32, 32)
    path = sigec.compile(tmp_path / "crop10.onnx", tmp_path / "crop10.sigec", mode="approx",
                         input_shapes={"x": SHAPE})
    assert "Traceback" not in capfd.readouterr().err  # nothing logged on the way
    engine = always_sparse(sigec.load(path))
    original, edited, mask = _edit()
    comparison = compare_with_oracle(engine, ort_oracle(model), original, edited, mask)
    assert_approx(comparison, inside=0.5, whole=0.5, context="opset-10 crop model")
    exact = always_sparse(sigec.load(sigec.compile(tmp_path / "crop10.onnx", tmp_path / "crop10x.sigec",
                                                   mode="exact", input_shapes={"x": SHAPE})))
    assert_exact(compare_with_oracle(exact, ort_oracle(model), original, edited, mask), context="exact")


def test_depth1_3d_convolutions_run_as_2d_and_match_onnxruntime(tmp_path):
    model = _depth1_conv_model()
    onnx.save(model, tmp_path / "video.onnx")
    canonical = load_onnx(tmp_path / "video.onnx")
    ranks = {n.op_type: len(static_shape(n.outputs[0])) for n in canonical.graph}
    assert ranks == {"Conv": 4, "ConvTranspose": 4, "Relu": 4, "LeakyRelu": 4, "MaxPool": 4, "Mul": 4,
                     "Concat": 4, "Identity": 4}, ranks  # BatchNorm folded, no 5-D value left
    engine = always_sparse(sigec.load(sigec.compile(tmp_path / "video.onnx", tmp_path / "video.sigec",
                                                    mode="exact", tile_size=4)))
    kinds = {n["name"]: n["kind"] for n in engine.manifest["nodes"]}
    assert all(kinds[name] == "sparse" for name in ("Conv_1", "Conv_4", "ConvTranspose_7", "Conv_10")), kinds
    original, edited, mask = _edit(3)
    assert_exact(compare_with_oracle(engine, ort_oracle(model), original, edited, mask), context="depth-1 Conv3d")


def test_a_5d_graph_output_keeps_its_name_and_shape(tmp_path):
    """A flat value the graph returns is restored to 5-D (under its own name) after the 2-D conv."""
    model = _depth1_conv_model()
    del model.graph.node[-2:]  # end with Conv_10's 5-D output
    model.graph.output[0].name = "c3"
    onnx.save(model, tmp_path / "video5.onnx")
    engine = always_sparse(sigec.load(sigec.compile(tmp_path / "video5.onnx", tmp_path / "video5.sigec",
                                                    mode="approx", tile_size=4)))
    assert [o["name"] for o in engine.manifest["outputs"]] == ["c3"]
    assert engine.manifest["outputs"][0]["shape"] == [1, 3, 1, 32, 32]
    original, edited, mask = _edit(4)
    comparison = compare_with_oracle(engine, ort_oracle(model), original, edited, mask)
    assert_approx(comparison, inside=0.5, whole=0.5, context="5-D output")


def test_shapes_onnx_cannot_infer_come_from_onnxruntime(tmp_path):
    """ONNX Runtime's contrib Gelu has no onnx schema, so onnx infers nothing after it; the shapes
    come from one ONNX Runtime run, and with fallback='dense' the op is a dense island."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv_in", pads=[1, 1, 1, 1]),
             helper.make_node("Gelu", ["c1"], ["g"], name="contrib_gelu", domain="com.microsoft"),
             helper.make_node("Conv", ["g", "w2"], ["c2"], name="conv_mid", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w3"], ["y"], name="conv_out", pads=[1, 1, 1, 1])]
    inits = [_weights(rng, "w1", 6, 3, 3, 3), _weights(rng, "w2", 6, 6, 3, 3), _weights(rng, "w3", 3, 6, 3, 3)]
    model = _model(nodes, inits, 18, extra_opsets=(("com.microsoft", 1),))
    onnx.save(model, tmp_path / "contrib.onnx")
    canonical = load_onnx(tmp_path / "contrib.onnx")
    assert static_shape(next(n for n in canonical.graph if n.name == "contrib_gelu").outputs[0]) == (1, 6, 32, 32)
    engine = always_sparse(sigec.load(sigec.compile(tmp_path / "contrib.onnx", tmp_path / "contrib.sigec",
                                                    mode="approx", fallback="dense")))
    kinds = {n["name"]: n["kind"] for n in engine.manifest["nodes"]}
    assert kinds["contrib_gelu"] == "dense" and kinds["conv_out"] == "sparse", kinds
    original, edited, mask = _edit(6)
    assert_approx(compare_with_oracle(engine, ort_oracle(model), original, edited, mask), inside=0.5, whole=0.5,
                  context="contrib op")


def test_a_shape_that_depends_on_values_is_refused_naming_the_node(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("NonZero", ["r"], ["nz"], name="where_positive"),
             helper.make_node("Cast", ["nz"], ["f"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", ["f"], ["y"], name="count", keepdims=0)]
    with pytest.raises(sigec.CompileError, match=r"'where_positive' \(NonZero\).*depends on the input values"):
        sigec.compile(_model(nodes, [], 18), tmp_path / "nz.sigec", fallback="dense")


@pytest.mark.parametrize("case", ["unknown op", "no adapter"])
def test_failures_name_the_node_without_a_traceback(tmp_path, capsys, case):
    if case == "unknown op":
        model = _model([helper.make_node("Relu", ["x"], ["r"], name="Relu_0"),
                        helper.make_node("Swizzle", ["r"], ["y"], name="Swizzle_1")], [], 10)
        expected = "node 'Swizzle_1' (Swizzle) is not an ONNX operator (opset 10)"
    else:  # opset 1 Pad has no version adapter in onnx
        model = _model([helper.make_node("Pad", ["x"], ["y"], name="Pad_0", paddings=[0, 0, 1, 1, 0, 0, 1, 1])], [], 1)
        expected = "cannot convert the model from opset 1 to opset 18 (onnx version converter) at node 'Pad_0' (Pad)"
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(sigec.CompileError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        sigec.compile(tmp_path / "m.onnx", tmp_path / "m.sigec")
    capsys.readouterr()
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.sigec"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err


def _focus_model(order: list[tuple[int, int]]) -> onnx.ModelProto:
    """Opset 11, as YOLOv5 / YOLOX exports their Focus layer: x[..., dy::2, dx::2] for the four
    offsets (two Slice nodes each), concatenated on channels in ``order``, then convolutions."""
    rng = np.random.default_rng(7)
    nodes, parts = [], []
    for k, (dy, dx) in enumerate(order):
        nodes += [helper.make_node("Slice", ["x", f"start{dy}", "end", "axis2", "two"], [f"rows{k}"],
                                   name=f"Slice_{2 * k}"),
                  helper.make_node("Slice", [f"rows{k}", f"start{dx}", "end", "axis3", "two"], [f"part{k}"],
                                   name=f"Slice_{2 * k + 1}")]
        parts.append(f"part{k}")
    nodes += [helper.make_node("Concat", parts, ["focus"], name="Concat_8", axis=1),
              helper.make_node("Conv", ["focus", "w1", "b1"], ["c1"], name="Conv_9", pads=[1, 1, 1, 1]),
              helper.make_node("Sigmoid", ["c1"], ["s1"], name="Sigmoid_10"),
              helper.make_node("Mul", ["c1", "s1"], ["a1"], name="Mul_11"),
              helper.make_node("Conv", ["a1", "w2"], ["y"], name="Conv_12", pads=[1, 1, 1, 1])]
    inits = [_ints("start0", [0]), _ints("start1", [1]), _ints("end", [2 ** 63 - 1]), _ints("axis2", [2]),
             _ints("axis3", [3]), _ints("two", [2]), _weights(rng, "w1", 8, 12, 3, 3), _weights(rng, "b1", 8),
             _weights(rng, "w2", 3, 8, 3, 3)]
    return _model(nodes, inits, 11)


@pytest.mark.parametrize("order", [[(0, 0), (1, 0), (0, 1), (1, 1)], [(0, 0), (0, 1), (1, 0), (1, 1)]],
                         ids=["yolov5-order", "space-to-depth-order"])
def test_focus_slices_become_space_to_depth_and_run_sparse(tmp_path, order):
    """The strided slices become one SpaceToDepth (the next Conv's input channels permuted when the
    order differs), so the model runs sparse from its input on; exact against ONNX Runtime."""
    model = _focus_model(order)
    onnx.save(model, tmp_path / "focus.onnx")
    canonical = load_onnx(tmp_path / "focus.onnx")
    assert [n.op_type for n in canonical.graph] == ["SpaceToDepth", "Conv", "Sigmoid", "Mul", "Conv"]
    engine = always_sparse(sigec.load(sigec.compile(tmp_path / "focus.onnx", tmp_path / "focus.sigec", mode="exact",
                                                    tile_size=4)))
    assert {n["name"]: n["kind"] for n in engine.manifest["nodes"]}["Conv_9"] == "sparse"
    original, edited, mask = _edit(8)
    assert_exact(compare_with_oracle(engine, ort_oracle(model), original, edited, mask), context=f"Focus {order}")


def test_trained_models_tool_finds_a_model_in_a_wheel_and_measures_it(tmp_path, monkeypatch):
    """tools/trained_models.py on a tiny conv net packed into a wheel (no download): it extracts the
    file, compiles it per setting and reports errors against ONNX Runtime on the original file."""
    import zipfile

    from helpers import load_tool

    tool = load_tool("trained_models")
    rng = np.random.default_rng(9)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    model = _model(nodes, [_weights(rng, "w1", 4, 3, 3, 3), _weights(rng, "w2", 1, 4, 3, 3)], 13, dynamic=True)
    wheel = tmp_path / "tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("tinypkg/models/det.onnx", model.SerializeToString())
    tiny = tool.TrainedModel("tiny_det", "tinypkg", "tinypkg/models/det.onnx", (1, 3, 64, 64), 1 / 255, 0.0,
                             "two convolutions", "map>T", 0.0)
    monkeypatch.setattr(tool, "MODELS", (tiny,))
    found = tool.find_models([str(tmp_path / "missing"), str(wheel)], tmp_path / "work")
    assert set(found) == {"tiny_det"} and found["tiny_det"]["model"].is_file()
    settings = [("approx d=1", {"mode": "approx", "approx_dilation": 1}), ("exact", {"mode": "exact"})]
    facts, rows = tool.measure_model(tiny, found["tiny_det"]["model"], settings=settings, edits=[0.01], repeats=1,
                                     threads=1, workdir=tmp_path, log=lambda message: None)
    by_setting = {r.setting: r for r in rows}
    assert by_setting["exact"].path == "sparse" and by_setting["exact"].rel_l2 < 1e-5
    assert by_setting["approx d=1"].rel_l2 < by_setting["approx d=1"].stale_rel_l2
    assert "| 1.0% | exact | sparse |" in tool.markdown(facts, rows)
