"""The sparse rewrite's structure: the decision table and its order, typed mask ids, per-resolution
tile sizes, the onnx-ir passes' PassResult semantics, and the shared nearest-Resize rule.

Sparse results are compared with ONNX Runtime running the original model (exact mode: max |error|
<= 1e-5 of the output's largest magnitude, while the edit changes the output by far more).
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper
from onnx import numpy_helper as nh

from helpers import engine_from_proto, rel_err
from random_nets import random_local_net
from sigec.core.options import DEFAULT_TILE_SIZE
from sigec.core.resize_rules import nearest_source_index
from sigec.frontends.onnx_frontend import load_onnx
from sigec.passes.build_full_graph import BuildFullGraphPass
from sigec.passes.build_sparse_graph import DECISIONS, BuildSparseGraphPass
from sigec.passes.cache_update_outputs import AddCacheUpdateOutputsPass
from sigec.passes.mask_builder import MaskProgramBuilder
from sigec.passes.remove_unused_inputs import RemoveUnusedInputsPass
from sigec.passes.sparse_context import RewriteContext, RewriteOptions, SpatialInputs
from sigec.passes.sparse_forms import EMPTY_MASK, PIXEL_MASK, Dense, MaskId, Sparse
from sigec.passes.sparse_rewrite import rewrite

TOLERANCE = 1e-5
C = 4


def _model(nodes: list, inputs: list, outputs: list, inits: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=[nh.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    return model


def _weights(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _steps_model() -> onnx.ModelProto:
    """One node for (almost) every step of the decision table, named after what it exercises."""
    rng = np.random.default_rng(0)
    f = onnx.TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("GroupNormalization", ["c1", "gn_scale", "gn_bias"], ["gn"], name="groupnorm", num_groups=2),
        helper.make_node("Mul", ["gn", "gamma"], ["gn_affine"], name="gamma"),
        helper.make_node("Neg", ["k"], ["neg_k"], name="neg_const"),
        helper.make_node("Mul", ["t", "neg_k"], ["ts"], name="scale_t"),
        helper.make_node("Add", ["gn_affine", "ts"], ["a"], name="add_t"),
        helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"),
        helper.make_node("Sigmoid", ["g"], ["gs"], name="sigmoid_of_gap"),
        helper.make_node("Mul", ["a", "gs"], ["m"], name="mul_gap"),
        helper.make_node("Reshape", ["a", "wide"], ["r"], name="to_wide"),
        helper.make_node("Relu", ["r"], ["rr"], name="relu_wide"),
        helper.make_node("Reshape", ["rr", "square"], ["back"], name="to_square"),
        helper.make_node("Add", ["m", "back"], ["s"], name="add_back"),
        helper.make_node("Conv", ["s", "w2"], ["same"], name="conv_auto_pad", kernel_shape=[3, 3],
                         auto_pad="SAME_UPPER"),
        helper.make_node("LpNormalization", ["same"], ["lp"], name="lp_norm", axis=1),
        helper.make_node("Conv", ["lp", "w3"], ["y"], name="conv_out", kernel_shape=[1, 1]),
    ]
    inits = {"w1": _weights(rng, C, 3, 3, 3), "b1": _weights(rng, C), "gn_scale": np.abs(_weights(rng, 2)) + 0.5,
             "gn_bias": _weights(rng, 2), "gamma": _weights(rng, 1, C, 1, 1), "k": _weights(rng, 1, C, 1, 1),
             "wide": np.array([1, C, 8, 32], np.int64), "square": np.array([1, C, 16, 16], np.int64),
             "w2": _weights(rng, C, C, 3, 3), "w3": _weights(rng, C, C, 1, 1)}
    model = _model(nodes, [helper.make_tensor_value_info("x", f, [1, 3, 16, 16]),
                           helper.make_tensor_value_info("t", f, [1, C, 1, 1])],
                   [helper.make_tensor_value_info("y", f, [1, C, 16, 16])], inits)
    # ONNX shape inference leaves a function op's output (GroupNormalization) unknown.
    model.graph.value_info.append(helper.make_tensor_value_info("gn", f, [1, C, 16, 16]))
    return model


def _ir_model(proto: onnx.ModelProto) -> ir.Model:
    """The proto with inferred shapes, not canonicalised (node names and constant nodes stay)."""
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _build(model: ir.Model, mode: str, tile_size: int | dict[str, int] = 4, fallback: str = "dense",
           dense_resolutions: tuple[str, ...] = ()) -> tuple[BuildSparseGraphPass, ir.passes.PassResult]:
    options = RewriteOptions(mode, tile_size, fallback, frozenset(dense_resolutions))
    build = BuildSparseGraphPass(RewriteContext.create(model, options, SpatialInputs.of(model)))
    return build, build(model)


def _ort(proto: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _assert_sparse_run_is_exact(proto: onnx.ModelProto, engine, seed: int = 0) -> None:
    """Prime, edit one square and run on the sparse path: equal to ONNX Runtime on the original model."""
    engine.dense_fallback_fraction = float("inf")  # keep every run on the sparse path
    rng = np.random.default_rng(seed)
    inputs = {i["name"]: rng.standard_normal(i["shape"]).astype(np.float32) for i in engine.manifest["inputs"]}
    name = next(i["name"] for i in engine.manifest["inputs"] if i["spatial"])
    edited = dict(inputs)
    edited[name] = inputs[name].copy()
    h, w = inputs[name].shape[2:]
    edited[name][..., h // 3:h // 3 + 2, w // 2:w // 2 + 3] += 2.0
    engine.prime(inputs)
    out = engine.run(edited)
    assert engine.stats.path == "sparse"
    expected, stale = _ort(proto, edited), _ort(proto, inputs)
    for o, e, s in zip(out, expected, stale):
        assert rel_err(o, e) <= TOLERANCE
        assert rel_err(s, e) > 100 * TOLERANCE  # the edit matters: returning the primed output would fail


# ---------------------------------------------------------------------------------------------- decision table


def test_the_docstring_states_the_decision_table_in_order():
    documented = re.findall(r"^\s*(\d+)\. ([^:(]+?)(?: \(| ?:)", BuildSparseGraphPass.__doc__, re.M)
    assert [int(n) for n, _ in documented] == list(range(1, len(DECISIONS) + 1))
    assert [name.strip() for _, name in documented] == [step.name.split(" (")[0] for step in DECISIONS]
    assert DECISIONS[-1].applies(None, None)  # the last step takes every node left  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_each_node_takes_the_first_step_that_applies(mode):
    model = _ir_model(_steps_model())
    build, _ = _build(model, mode)
    after_island = "downstream of a dense island (exact)"
    expected = {
        "conv": "sparse rule",
        "groupnorm": "frozen normalisation" if mode == "approx" else "global op",
        "gamma": "inside a frozen normalisation" if mode == "approx" else after_island,
        "neg_const": "constant",
        "scale_t": "static",
        # reads the static value as a cache, then its rule (exact: after the GroupNorm island)
        "add_t": "sparse rule" if mode == "approx" else after_island,
        "gap": "global reduction" if mode == "approx" else after_island,  # passes/global_rules.py
        "sigmoid_of_gap": "no feature-map output" if mode == "approx" else after_island,
        "mul_gap": "sparse rule" if mode == "approx" else after_island,
        "to_wide": "global op" if mode == "approx" else after_island,
        "relu_wide": "inside a dense island" if mode == "approx" else after_island,
        "to_square": "global op" if mode == "approx" else after_island,
        "add_back": "sparse rule" if mode == "approx" else after_island,
        "conv_auto_pad": "unsupported" if mode == "approx" else after_island,  # the rule declines auto_pad
        "lp_norm": "unsupported" if mode == "approx" else after_island,
        "conv_out": "sparse rule" if mode == "approx" else after_island,
    }
    assert build.decisions == expected
    if mode == "approx":
        static = build.ctx.caches.specs["cache::ts"]
        assert static.kind == "static"
        notes = {r.name: r.note for r in build.ctx.record.reports}
        assert notes["conv_auto_pad"] == "fallback: auto_pad other than NOTSET"
        assert notes["lp_norm"] == "fallback: no sparse rule for this op"


def test_dense_resolutions_come_before_frozen_normalisation_and_rules():
    build, _ = _build(_ir_model(_steps_model()), "approx", dense_resolutions=("r16x16",))
    assert build.decisions["conv"] == "dense resolution"  # has a rule, but its map runs dense
    assert build.decisions["groupnorm"] == "global op"  # not frozen: its output's resolution runs dense
    # No sparse tensor on r16x16 exists, so the GroupNorm's island continues through its affine.
    assert build.decisions["gamma"] == "inside a dense island"
    assert set(build.decisions.values()) <= {"dense resolution", "global op", "inside a dense island", "constant",
                                             "static", "no feature-map output", "unsupported"}


def test_without_fallback_every_unsupported_node_is_named():
    from sigec.core.errors import CompileError

    with pytest.raises(CompileError) as info:
        _build(_ir_model(_steps_model()), "approx", fallback="error")
    message = str(info.value)
    assert "'conv_auto_pad' (Conv): auto_pad other than NOTSET" in message
    assert "'lp_norm' (LpNormalization): no sparse rule for this op" in message


def test_the_steps_model_runs_exactly_in_exact_mode():
    proto = _steps_model()
    engine = engine_from_proto(proto, mode="exact", tile_size=4, fallback="dense", backend="ort")
    kinds = {n["name"]: n["kind"] for n in engine.manifest["nodes"]}
    assert kinds["conv"] == "sparse"
    _assert_sparse_run_is_exact(proto, engine)


# ---------------------------------------------------------------------------------------------- typed mask ids


def test_mask_program_builder_speaks_mask_ids():
    masks = MaskProgramBuilder(track=True, input_size=[8, 8])
    a = masks.window(PIXEL_MASK, [8, 8], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], [8, 8])
    b = masks.upsample(PIXEL_MASK, [2, 2], [16, 16])
    assert isinstance(a, MaskId) and isinstance(b, MaskId) and a != b
    assert masks.window(PIXEL_MASK, [8, 8], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], [8, 8]) == a  # deduplicated
    assert masks.window(EMPTY_MASK, [8, 8], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], [8, 8]) == EMPTY_MASK
    assert masks.window(None, [8, 8], [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], [8, 8]) is None
    assert masks.union([EMPTY_MASK, a, EMPTY_MASK]) == a
    assert masks.union([b, a, None]) is None
    assert masks.union([EMPTY_MASK]) == EMPTY_MASK
    union = masks.union([b, a])
    assert masks.instructions[-1] == {"op": "union", "out": union.id, "srcs": sorted([a.id, b.id])}
    # The manifest never names the symbolic empty mask: an instruction stands for it.
    empty = masks.resolution_mask([4, 4], [EMPTY_MASK], dilation=0)
    assert empty != EMPTY_MASK and masks.instructions[-1] == {"op": "empty", "out": empty.id, "size": [4, 4]}
    assert all(isinstance(v, str) for ins in masks.instructions for k, v in ins.items() if k in ("src", "out"))


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_every_form_carries_a_mask_id_or_unknown(mode):
    build, _ = _build(_ir_model(_steps_model()), mode)
    forms = list(build.ctx.forms.all())
    masks = [f.mask for f in forms if isinstance(f, (Sparse, Dense))]
    assert masks and all(m is None or isinstance(m, MaskId) for m in masks)
    assert any(isinstance(f, Dense) and f.mask == PIXEL_MASK for f in forms)  # the model input
    if mode == "exact":
        assert any(isinstance(f, Sparse) and isinstance(f.mask, MaskId) and f.mask != PIXEL_MASK for f in forms)


def test_the_mask_program_has_no_unused_instruction():
    """Reflect/edge pads widen the receptive field through one helper: no zero-pad window is
    emitted and then dropped (random net 1 materialises a reflect Pad)."""
    result = rewrite(load_onnx(random_local_net(1, batch=2)), mode="exact", tile_size=8)
    program = result.manifest["mask_program"]
    used = {r["mask"] for r in result.manifest["resolutions"]}
    for ins in program["instructions"]:
        used.update([ins["src"]] if "src" in ins else ins.get("srcs", []))
    assert [ins["out"] for ins in program["instructions"] if ins["out"] not in used] == []


# ---------------------------------------------------------------------------------------------- tile sizes


def test_a_per_resolution_tile_size_leaves_the_others_at_the_default():
    proto = random_local_net(1, batch=2)
    names = [r["name"] for r in rewrite(load_onnx(proto), mode="exact").manifest["resolutions"]]
    assert len(names) >= 2
    first = names[0]
    tiles = {r["name"]: r["tile"] for r in rewrite(load_onnx(proto), mode="exact",
                                                   tile_size={first: 8}).manifest["resolutions"]}
    assert tiles == {name: 8 if name == first else DEFAULT_TILE_SIZE for name in names}
    tiles = {r["name"]: r["tile"] for r in rewrite(load_onnx(proto), mode="exact",
                                                   tile_size={first: 8, "default": 2}).manifest["resolutions"]}
    assert tiles == {name: 8 if name == first else 2 for name in names}
    engine = engine_from_proto(proto, mode="exact", tile_size={first: 8}, backend="ort")
    assert {r["name"]: r["tile"] for r in engine.manifest["resolutions"]}[names[1]] == DEFAULT_TILE_SIZE
    _assert_sparse_run_is_exact(proto, engine)


# ---------------------------------------------------------------------------------------------- PassResult semantics


def test_building_the_sparse_graph_is_functional():
    model = load_onnx(_steps_model())
    before = ir.serde.serialize_model(model).SerializeToString()
    _, result = _build(model, "approx")
    assert result.modified and result.model is not model
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert {v.name for v in result.model.graph.inputs} >= {"x"}
    assert result.model.opset_imports["ai.sigec"] == 1


def test_dead_nodes_and_their_inputs_are_pruned_by_onnx_ir_passes():
    """Add's rule gathers x's tiles, then declines (the operand broadcasts over the rows): the gather
    and the tile index it read are dead once the node runs dense."""
    rng = np.random.default_rng(1)
    f = onnx.TensorProto.FLOAT
    proto = _model([helper.make_node("Add", ["x", "rows"], ["y"], name="add_rows")],
                   [helper.make_tensor_value_info("x", f, [1, C, 16, 16])],
                   [helper.make_tensor_value_info("y", f, [1, C, 16, 16])], {"rows": _weights(rng, 1, C, 16, 1)})
    model = _ir_model(proto)
    build, result = _build(model, "approx")
    sparse = result.model
    assert {v.name for v in sparse.graph.inputs} == {"x", "tiles::coords::r16x16"}
    assert [n.op_type for n in sparse.graph] == ["TileGather", "Add"]
    removed = ir.passes.common.RemoveUnusedNodesPass()(sparse)
    assert removed.modified and [n.op_type for n in sparse.graph] == ["Add"]
    pruned = RemoveUnusedInputsPass(keep=["x"])(sparse)
    assert pruned.modified and pruned.model is sparse and [v.name for v in sparse.graph.inputs] == ["x"]
    again = RemoveUnusedInputsPass(keep=["x"])(sparse)
    assert not again.modified and [v.name for v in sparse.graph.inputs] == ["x"]


def test_unused_inputs_stay_when_kept_or_when_they_are_outputs():
    f = ir.DataType.FLOAT
    a, b, c, d = (ir.Value(name=n, type=ir.TensorType(f), shape=ir.Shape([1])) for n in "abcd")
    node = ir.Node("", "Relu", [c], num_outputs=1)
    graph = ir.Graph([a, b, c, d], [node.outputs[0], d], nodes=[node], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    assert RemoveUnusedInputsPass(keep=["b"])(model).modified
    assert [v.name for v in graph.inputs] == ["b", "c", "d"]


def test_cache_update_outputs_are_added_once():
    model = load_onnx(random_local_net(1, batch=2))
    build, result = _build(model, "exact", tile_size=8, fallback="error")
    sparse = ir.passes.common.RemoveUnusedNodesPass()(result.model).model
    add = AddCacheUpdateOutputsPass(build.ctx)
    first = add(sparse)
    updates = list(build.ctx.record.updates)
    outputs = [v.name for v in sparse.graph.outputs]
    assert first.modified and updates and all(u["output"] in outputs for u in updates)
    second = add(sparse)
    assert not second.modified and [v.name for v in sparse.graph.outputs] == outputs
    assert build.ctx.record.updates == updates


def test_full_graph_adds_only_missing_cache_outputs():
    rng = np.random.default_rng(2)
    f = onnx.TensorProto.FLOAT
    one_conv = _model([helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
                      [helper.make_tensor_value_info("x", f, [1, 2, 8, 8])],
                      [helper.make_tensor_value_info("y", f, [1, 2, 8, 8])], {"w": _weights(rng, 2, 2, 3, 3)})
    for proto, expect_added in ((one_conv, False), (random_local_net(1, batch=2), True)):
        model = load_onnx(proto)
        build, result = _build(model, "exact", tile_size=8, fallback="error")
        caches = build.ctx.caches.read_by(result.model.graph)
        before = ir.serde.serialize_model(model).SerializeToString()
        full = BuildFullGraphPass(caches, build.ctx.caches.stats, build.ctx.batch)(model)
        assert full.model is not model and full.modified == expect_added
        assert ir.serde.serialize_model(model).SerializeToString() == before
        outputs = {v.name for v in full.model.graph.outputs}
        inputs = {v.name for v in full.model.graph.inputs}
        assert all(c.source in outputs | inputs for c in caches)


# ---------------------------------------------------------------------------------------------- nearest Resize rule


def _resize_net(size_in: int, size_out: int, ctm: str, nearest_mode: str) -> onnx.ModelProto:
    rng = np.random.default_rng(size_in * 100 + size_out)
    f = onnx.TensorProto.FLOAT
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Resize", ["c", "", "", "sizes"], ["r"], mode="nearest",
                              coordinate_transformation_mode=ctm, nearest_mode=nearest_mode),
             helper.make_node("Conv", ["r", "w2"], ["y"], kernel_shape=[1, 1])]
    return _model(nodes, [helper.make_tensor_value_info("x", f, [1, 2, size_in, size_in])],
                  [helper.make_tensor_value_info("y", f, [1, 2, size_out, size_out])],
                  {"w": _weights(rng, 2, 2, 3, 3), "w2": _weights(rng, 2, 2, 1, 1),
                   "sizes": np.array([1, 2, size_out, size_out], np.int64)})


def _ort_resize_index(size_in: int, size_out: int, ctm: str, nearest_mode: str) -> np.ndarray:
    f = onnx.TensorProto.FLOAT
    proto = _model([helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
                                     coordinate_transformation_mode=ctm, nearest_mode=nearest_mode)],
                   [helper.make_tensor_value_info("x", f, [1, 1, 1, size_in])],
                   [helper.make_tensor_value_info("y", f, None)], {"sizes": np.array([1, 1, 1, size_out], np.int64)})
    out = _ort(proto, {"x": np.arange(size_in, dtype=np.float32).reshape(1, 1, 1, size_in)})[0]
    return out.reshape(-1).astype(np.int64)


@pytest.mark.parametrize("ctm", ["asymmetric", "align_corners", "half_pixel", "pytorch_half_pixel"])
@pytest.mark.parametrize("nearest_mode", ["floor", "ceil", "round_prefer_floor", "round_prefer_ceil"])
def test_the_nearest_index_rule_is_onnx_runtimes(ctm, nearest_mode):
    # Float32 coordinates that land just below an integer (e.g. 1 / (2 / 14) = 6.9999995) are included.
    for size_in, size_out in [(14, 2), (30, 2), (7, 1), (21, 3), (126, 2), (5, 7), (8, 32), (9, 18), (30, 10)]:
        expected = _ort_resize_index(size_in, size_out, ctm, nearest_mode)
        assert np.array_equal(nearest_source_index(size_out, size_in, ctm, nearest_mode), expected), (size_in, size_out)


def test_the_executor_and_the_compiler_share_the_rule():
    from sigec.core import resize_rules
    from sigec.runtime import torch_onnx_ops_resize

    assert torch_onnx_ops_resize.nearest_index is resize_rules.nearest_index
    assert torch_onnx_ops_resize.original_coordinates is resize_rules.original_coordinates


@pytest.mark.parametrize("size_in,size_out,ctm,nearest_mode,sparse", [
    (30, 2, "half_pixel", "floor", True),  # offset 6 (float32), not 7 (exact arithmetic)
    (14, 2, "asymmetric", "floor", False),  # ONNX Runtime reads 0 and 6: not an integer downscale
])
def test_nearest_downscale_geometry_follows_onnx_runtime(size_in, size_out, ctm, nearest_mode, sparse):
    proto = _resize_net(size_in, size_out, ctm, nearest_mode)
    engine = engine_from_proto(proto, mode="exact", tile_size=4, fallback="dense", backend="ort")
    resize = next(n for n in engine.manifest["nodes"] if n["op_type"] == "Resize")
    assert (resize["kind"] == "sparse") == sparse
    engine.dense_fallback_fraction = float("inf")
    rng = np.random.default_rng(3)
    x0 = rng.standard_normal((1, 2, size_in, size_in)).astype(np.float32)
    engine.prime({"x": x0})
    expected_stale = _ort(proto, {"x": x0})[0]
    changed = 0
    # Single-pixel edits, some next to the pixels ONNX Runtime samples (6 and 21, resp. 0 and 6).
    for y, x in [(0, 0), (6, 6), (6, 7), (7, 6), (size_in - 1, size_in - 1), (size_in // 2, 1)]:
        x1 = x0.copy()
        x1[..., y, x] += 3.0
        out = engine.run({"x": x1})[0]
        assert engine.stats.path == "sparse"
        expected = _ort(proto, {"x": x1})[0]
        assert rel_err(out, expected) <= TOLERANCE, (y, x)
        changed += rel_err(expected_stale, expected) > 100 * TOLERANCE
    assert changed  # some edits reach the sampled pixels, so a wrong offset would show


@pytest.mark.parametrize("mode", ["reflect", "edge", "constant"])
def test_a_folded_pad_read_by_a_dense_resolution_is_padded_densely(mode):
    """A Pad kept virtual for the next convolution, whose output lies on a resolution forced dense:
    the convolution runs dense on the padded full tensor (this raised an internal error before)."""
    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    inits = [nh.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w1"),
             nh.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), "w2"),
             nh.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"], pads=[1, 1, 1, 1], name="c1"),
             helper.make_node("Pad", ["a", "pads"], ["p"], mode=mode, name="pad"),
             helper.make_node("Conv", ["p", "w2"], ["y"], strides=[2, 2], name="c2")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    # float32 caches: the check below is to float32 rounding (the approx default stores float16 caches)
    engine = engine_from_proto(model, mode="approx", dense_resolutions=("r16x16",), cache_dtype="float32")
    engine.dense_fallback_fraction = float("inf")
    x0 = rng.standard_normal((1, 3, 32, 32)).astype(np.float32)
    primed = engine.prime({"x": x0})[0]
    x1 = x0.copy()
    x1[..., 10:14, 10:14] += 1.0
    sparse = engine.run({"x": x1})[0]
    assert engine.stats.path == "sparse"
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x1})[0]
    change = rel_err(primed, expected)
    assert change > 1e-2
    assert rel_err(sparse, expected) <= 1e-5 * max(change, 1.0)
