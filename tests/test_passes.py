"""Each graph pass on small hand-built graphs: the rewrite happens and the numbers do not change
(checked with ONNX Runtime on the original and the rewritten graph)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from helpers import EXACT_TOLERANCE, always_sparse, engine_from_proto, ort_oracle, rel_err
from sigec.frontends.onnx_frontend import canonicalize
from sigec.passes.fold_batchnorm import FoldBatchNormPass
from sigec.passes.fold_pad_into_conv import FoldPadIntoConvPass
from sigec.passes.group_norm_match import find_norms

RNG = np.random.default_rng(0)


def _init(name, array):
    return onnx.numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inits, in_shape, out_shape, opset=18):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's output ``y`` computed by ONNX Runtime."""
    return ort_oracle(model)({"x": x})[0]


def test_fold_batchnorm_removes_the_node_and_keeps_the_result():
    c = 4
    model = _model([helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                    helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["y"], epsilon=1e-3)],
                   [_init("w", RNG.standard_normal((c, 3, 3, 3)).astype(np.float32)),
                    _init("b", RNG.standard_normal(c).astype(np.float32)),
                    _init("s", RNG.uniform(0.5, 2, c).astype(np.float32)), _init("t", RNG.standard_normal(c).astype(np.float32)),
                    _init("m", RNG.standard_normal(c).astype(np.float32)), _init("v", RNG.uniform(0.5, 2, c).astype(np.float32))],
                   [1, 3, 8, 8], [1, c, 8, 8])
    ir_model = ir.from_proto(model)
    assert FoldBatchNormPass()(ir_model).modified
    folded = ir.to_proto(ir_model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert folded.graph.output[0].name == "y"
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert rel_err(_run(folded, x), _run(model, x)) < 1e-5


def test_fold_zero_pad_into_conv():
    model = _model([helper.make_node("Pad", ["x", "p"], ["q"], mode="constant"),
                    helper.make_node("Conv", ["q", "w"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 0, 0])],
                   [_init("p", np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64)),
                    _init("w", RNG.standard_normal((2, 3, 3, 3)).astype(np.float32))], [1, 3, 8, 8], [1, 2, 4, 4])
    ir_model = ir.from_proto(model)
    assert FoldPadIntoConvPass()(ir_model).modified
    folded = ir.to_proto(ir_model)
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    assert list(helper.get_attribute_value(folded.graph.node[0].attribute[-1])) == [0, 0, 1, 1] or \
        [a for a in folded.graph.node[0].attribute if a.name == "pads"][0].ints == [0, 0, 1, 1]
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert rel_err(_run(folded, x), _run(model, x)) < 1e-6


def test_reflect_pad_is_not_folded():
    model = _model([helper.make_node("Pad", ["x", "p"], ["q"], mode="reflect"),
                    helper.make_node("Conv", ["q", "w"], ["y"], kernel_shape=[3, 3])],
                   [_init("p", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
                    _init("w", RNG.standard_normal((2, 3, 3, 3)).astype(np.float32))], [1, 3, 8, 8], [1, 2, 8, 8])
    assert not FoldPadIntoConvPass()(ir.from_proto(model)).modified


def _group_norm_chain(kind, c=8, g=2, hw=8, opset=18):
    gamma = RNG.uniform(0.5, 1.5, (c, 1, 1)).astype(np.float32)
    beta = RNG.normal(0, 0.2, (c, 1, 1)).astype(np.float32)
    conv = helper.make_node("Conv", ["x", "w"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    inits = [_init("w", RNG.standard_normal((c, 3, 3, 3)).astype(np.float32)), _init("gamma", gamma), _init("beta", beta),
             _init("shape3", np.array([1, g, -1], np.int64)), _init("shape4", np.array([1, c, hw, hw], np.int64))]
    if kind == "instance_norm":
        inits += [_init("ones", np.ones(g, np.float32)), _init("zeros", np.zeros(g, np.float32))]
        body = [helper.make_node("Reshape", ["h", "shape3"], ["r"]),
                helper.make_node("InstanceNormalization", ["r", "ones", "zeros"], ["n"], epsilon=1e-5),
                helper.make_node("Reshape", ["n", "shape4"], ["b"])]
    elif kind == "reduce_mean":
        inits += [_init("axes", np.array([2], np.int64)), _init("two", np.array(2.0, np.float32)),
                  _init("eps", np.array(1e-5, np.float32))]
        body = [helper.make_node("Reshape", ["h", "shape3"], ["r"]),
                helper.make_node("ReduceMean", ["r", "axes"], ["mu"]), helper.make_node("Sub", ["r", "mu"], ["d"]),
                helper.make_node("Pow", ["d", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq", "axes"], ["var"]),
                helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
                helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Reshape", ["n", "shape4"], ["b"])]
    else:  # native GroupNormalization (opset 21: per-channel scale and bias)
        inits += [_init("sc", gamma.reshape(-1)), _init("bi", beta.reshape(-1))]
        body = [helper.make_node("GroupNormalization", ["h", "sc", "bi"], ["y0"], num_groups=g, epsilon=1e-5),
                helper.make_node("Relu", ["y0"], ["y"])]
        return _model([conv, *body], inits, [1, 3, hw, hw], [1, c, hw, hw], opset=opset)
    tail = [helper.make_node("Mul", ["b", "gamma"], ["gm"]), helper.make_node("Add", ["gm", "beta"], ["y0"]),
            helper.make_node("Relu", ["y0"], ["y"])]
    return _model([conv, *body, *tail], inits, [1, 3, hw, hw], [1, c, hw, hw], opset=opset)


@pytest.mark.parametrize("kind,opset", [("instance_norm", 18), ("reduce_mean", 18), ("native", 21)])
def test_group_norm_patterns_are_matched_and_frozen_statistics_are_exact_on_the_primed_input(kind, opset):
    model = _group_norm_chain(kind, opset=opset)
    matches = find_norms(canonicalize(model))
    assert len(matches) == 1
    match = next(iter(matches.values()))
    assert match.groups == 2 and abs(match.epsilon - 1e-5) < 1e-9
    engine = always_sparse(engine_from_proto(model, mode="approx"))
    assert any("frozen" in a["detail"] for a in engine.manifest["approximations"])
    x = RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)
    expected = ort_oracle(model)({"x": x})[0]
    assert rel_err(engine.prime({"x": x})[0], expected) <= EXACT_TOLERANCE
    # With every tile active and the primed input, the frozen statistics are the true ones.
    full = engine.run({"x": x}, mask=np.ones((8, 8), bool))
    assert engine.stats.path == "sparse"
    assert rel_err(full[0], expected) <= EXACT_TOLERANCE
    # With another input, statistics frozen from the primed one are not the true ones: the sparse
    # run must differ from the model (else this check could not see frozen statistics at all).
    y = x + 1.0
    assert rel_err(engine.run({"x": y}, mask=np.ones((8, 8), bool))[0], ort_oracle(model)({"x": y})[0]) > 1e-3
    assert engine.stats.path == "sparse"


def test_cost_model_matches_the_per_node_sum():
    from sigec.runtime import costs
    from sigec.core.mask_program import TileIndex

    nodes = [{"kind": "sparse", "resolution": "r8x8", "macs_per_tile": 10, "dense_macs": 100},
             {"kind": "approx", "resolution": "r4x4", "macs_per_tile": 7, "dense_macs": 50},
             {"kind": "dense", "dense_macs": 30}, {"kind": "static", "dense_macs": 1000}, {"kind": "constant"}]
    tiles = {"r8x8": TileIndex(np.zeros((3, 3), np.int64), np.zeros((1, 2, 2), np.int64)),
             "r4x4": TileIndex(np.zeros((2, 3), np.int64), np.zeros((1, 1, 1), np.int64))}
    model = costs.CostModel(nodes)
    assert model.executed(tiles) == costs.executed_macs(nodes, tiles) == 3 * 10 + 2 * 7 + 30
    assert model.dense == costs.dense_macs(nodes) == 180
