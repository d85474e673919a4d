"""Incremental global pooling (passes/global_rules.py): GlobalAveragePool and ReduceMean / ReduceSum over
the spatial axes of a sparse map computed from the cached reduction plus the active tiles' change.

Models: a squeeze-excitation block built with onnx.helper (conv with a bias -> pooling -> 1x1 conv,
ReLU, 1x1 conv, sigmoid -> the map times the gate -> conv), with the pooled value a model output too,
in every spelling of the pooling (GlobalAveragePool; ReduceMean with axes as input or attribute,
keepdims 1 or 0; ReduceSum; ReduceMean of x * x), on maps whose size is a multiple of the tile and on
maps whose bottom/right tiles are partial, batch 1 and 2; plus the MobileNetV3-style SE backbone of
tools/bench_global_pool.py exported from PyTorch.

Tolerance: the pooled value and, in exact mode, every output equal ONNX Runtime on the original
model to ``EXACT_TOLERANCE`` (1e-5) of the output's largest magnitude; the summation order differs
(cached reduction + change of the active tiles), so they are equal up to float rounding only.
Approx mode: the pooled value to the same tolerance, and the output inside the edited region too
(the gate is exact, and approx mode applies it only on active tiles, so outside the region the output
keeps the old gate's values: the usual approximation).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from onnx import numpy_helper as nh

from helpers import (EXACT_TOLERANCE, always_sparse, assert_approx, assert_exact, compare_with_oracle,
                     engine_from_proto, load_tool, ort_oracle, rel_err)
from sigec.frontends.onnx_frontend import load_onnx
from sigec.frontends.torch_frontend import export_module
from sigec.passes import global_rules
from sigec.passes.sparse_rewrite import rewrite

F = onnx.TensorProto.FLOAT
C = 8
POOL_OPS = ("GlobalAveragePool", "ReduceMean", "ReduceSum")


def _axes(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


# Each spelling: (opset, nodes reading "h" and writing "p" [B, C, 1, 1], constant inputs). "p" is what
# the gate reads and a model output; "q" (when present) is the pooling node's own output.
Pooling = tuple[int, list[onnx.NodeProto], dict[str, np.ndarray]]
SPELLINGS: dict[str, Pooling] = {
    "global_average_pool": (18, [helper.make_node("GlobalAveragePool", ["h"], ["p"])], {}),
    "mean_axes_input": (18, [helper.make_node("ReduceMean", ["h", "ax"], ["p"], keepdims=1)], {"ax": _axes(2, 3)}),
    "mean_negative_axes_no_keepdims": (
        18, [helper.make_node("ReduceMean", ["h", "ax"], ["q"], keepdims=0),
             helper.make_node("Unsqueeze", ["q", "ax_u"], ["p"])], {"ax": _axes(-1, -2), "ax_u": _axes(2, 3)}),
    "mean_axes_attribute": (13, [helper.make_node("ReduceMean", ["h"], ["p"], axes=[2, 3])], {}),
    "sum": (18, [helper.make_node("ReduceSum", ["h", "ax"], ["p"])], {"ax": _axes(2, 3)}),
    "mean_of_square": (18, [helper.make_node("Mul", ["h", "h"], ["hh"]),
                            helper.make_node("ReduceMean", ["hh", "ax"], ["p"])], {"ax": _axes(2, 3)}),
}

GEOMETRIES = {  # (batch, height, width, tile)
    "whole_tiles": (1, 16, 16, 4),
    "partial_tiles_batch2": (2, 13, 18, 4),
}


def _se_model(spelling: str | Pooling = "global_average_pool", batch: int = 1, height: int = 16, width: int = 16
              ) -> onnx.ModelProto:
    """x [B, 3, H, W] -> conv 3x3 (+ a bias, so that tiles past the border are not 0) = h -> pooling
    (a name of SPELLINGS or such a triple) -> p [B, C, 1, 1] -> 1x1 conv, ReLU, 1x1 conv, sigmoid = g
    -> y = h * g -> conv 3x3 = out. Outputs: ``out`` and ``p``."""
    opset, pool_nodes, constants = SPELLINGS[spelling] if isinstance(spelling, str) else spelling
    rng = np.random.default_rng(3)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = {"w0": w(C, 3, 3, 3), "b0": w(C) + 0.5, "w1": w(4, C, 1, 1), "b1": w(4), "w2": w(C, 4, 1, 1),
             "b2": w(C), "w3": w(4, C, 3, 3), **constants}
    if spelling == "sum":
        inits["w1"] /= height * width  # keep the gate out of saturation
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             *pool_nodes,
             helper.make_node("Conv", ["p", "w1", "b1"], ["f1"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["f1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["f2"], kernel_shape=[1, 1]),
             helper.make_node("Sigmoid", ["f2"], ["g"]),
             helper.make_node("Mul", ["h", "g"], ["y"]),
             helper.make_node("Conv", ["y", "w3"], ["out"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "se_block", [helper.make_tensor_value_info("x", F, [batch, 3, height, width])],
                              [helper.make_tensor_value_info("out", F, [batch, 4, height, width]),
                               helper.make_tensor_value_info("p", F, [batch, C, 1, 1])],
                              initializer=[nh.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _edit(batch: int, height: int, width: int, seed: int = 0
          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """Random x and x changed in a square touching the bottom-right corner (the partial tiles, when the
    map has them) in batch item 0 and, with batch 2, in a square inside the map in batch item 1."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, height, width)).astype(np.float32)
    mask = np.zeros((batch, height, width), bool)
    mask[0, height - 4:, width - 5:] = True
    if batch > 1:
        mask[1, 2:5, 3:7] = True
    edited = (x + 1.5 * mask[:, None] * rng.standard_normal(x.shape)).astype(np.float32)
    return {"x": x}, {"x": edited}, mask


def _pool_report(engine_or_manifest) -> dict:
    manifest = getattr(engine_or_manifest, "manifest", engine_or_manifest)
    (report,) = [n for n in manifest["nodes"] if n["op_type"] in POOL_OPS]
    return report


def _ancestors(model: onnx.ModelProto, name: str) -> set[str]:
    """Op types of every node of ``model`` that the value ``name`` depends on."""
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, ops, todo = set(), set(), [name]
    while todo:
        value = todo.pop()
        node = producer.get(value)
        if node is None or value in seen:
            continue
        seen.add(value)
        ops.add(node.op_type)
        todo.extend(node.input)
    return ops


@pytest.fixture
def without_global_rules(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The rewrite as it was: global pooling is a dense island."""
    for op in list(global_rules.GLOBAL_RULES):
        monkeypatch.delitem(global_rules.GLOBAL_RULES, op)
    yield


# ---------------------------------------------------------------------------------------------- exact mode


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_exact_mode_equals_onnx_runtime(spelling, geometry):
    batch, height, width, tile = GEOMETRIES[geometry]
    proto = _se_model(spelling, batch, height, width)
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=tile, backend="ort"))
    report = _pool_report(engine)
    assert report["kind"] == "sparse" and report["note"] == "incremental global pooling", report
    original, edited, mask = _edit(batch, height, width)
    assert_exact(compare_with_oracle(engine, ort_oracle(proto), original, edited, mask), context=spelling)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_torch_backend_runs_the_rule(geometry):
    batch, height, width, tile = GEOMETRIES[geometry]
    proto = _se_model("mean_axes_input", batch, height, width)
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=tile, backend="torch"))
    original, edited, mask = _edit(batch, height, width)
    assert_exact(compare_with_oracle(engine, ort_oracle(proto), original, edited, mask))


# ---------------------------------------------------------------------------------------------- approx mode


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("spelling", ["global_average_pool", "mean_negative_axes_no_keepdims", "mean_of_square"])
def test_approx_mode_pools_exactly(spelling, geometry):
    batch, height, width, tile = GEOMETRIES[geometry]
    proto = _se_model(spelling, batch, height, width)
    engine = always_sparse(engine_from_proto(proto, mode="approx", tile_size=tile, backend="ort"))
    assert _pool_report(engine)["kind"] == "sparse"
    original, edited, mask = _edit(batch, height, width)
    c = compare_with_oracle(engine, ort_oracle(proto), original, edited, mask)
    expected = ort_oracle(proto)(edited)
    pooled_err = rel_err(c.outputs[1], expected[1])
    assert pooled_err <= EXACT_TOLERANCE, f"pooled value: {pooled_err:.2e}; {c}"
    assert rel_err(engine.prime(original)[1], expected[1]) > 100 * EXACT_TOLERANCE  # the edit moves it
    assert c.sparse_l2_inside <= EXACT_TOLERANCE, f"inside the edit: {c}"
    assert_approx(c, inside=0.01, whole=1.0, context=spelling)


# ---------------------------------------------------------------------------------------------- the SPARSE graph


@pytest.mark.parametrize("mode", ["exact", "approx"])
def test_no_scatter_feeds_the_pooling(mode, without_global_rules, monkeypatch):
    proto = _se_model()
    before = rewrite(load_onnx(proto), mode=mode, tile_size=4)
    assert "TileScatter" in _ancestors(before.sparse, "p")  # the check bites: the dense island scattered
    assert _pool_report(before.manifest)["kind"] == "dense"
    monkeypatch.undo()
    after = rewrite(load_onnx(proto), mode=mode, tile_size=4)
    ops = _ancestors(after.sparse, "p")
    assert "TileScatter" not in ops and "GlobalAveragePool" not in ops, ops
    assert "TileGather" in ops  # the old tiles, read from the cached map
    assert "cache::p" in {c["name"] for c in after.manifest["caches"]}
    if mode == "approx":  # the scatter for the pooling is gone; only the model output scatters
        assert [n.op_type for n in after.sparse.graph.node].count("TileScatter") == 1


def test_partial_tiles_need_the_validity_mask(monkeypatch):
    """Past the border of a 13 x 18 map the tiles hold conv(0) + bias != 0: without the mask the pooled
    value is wrong (the check bites), with it it is exact."""
    proto = _se_model("global_average_pool", 1, 13, 18)
    original, edited, mask = _edit(1, 13, 18)
    expected = ort_oracle(proto)(edited)[1]
    for masked in (True, False):
        if not masked:
            monkeypatch.setattr(global_rules, "_valid_positions", lambda *a: None)
        engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=4, backend="ort"))
        engine.prime(original)
        pooled = engine.run(edited, mask=mask)[1]
        assert engine.stats.path == "sparse"
        assert (rel_err(pooled, expected) <= EXACT_TOLERANCE) == masked, (masked, rel_err(pooled, expected))


@pytest.mark.parametrize("nodes, constants", [
    ([helper.make_node("ReduceMean", ["h", "ax"], ["m"]), helper.make_node("Expand", ["m", "shape"], ["p"])],
     {"ax": _axes(1, 2, 3), "shape": _axes(1, C, 1, 1)}),
    ([helper.make_node("GlobalMaxPool", ["h"], ["p"])], {}),
], ids=["mean_over_channels_too", "global_max_pool"])
def test_other_reductions_stay_dense_islands(nodes, constants):
    proto = _se_model((18, nodes, constants))
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=4, backend="ort"))
    reduction = [n for n in engine.manifest["nodes"] if n["op_type"] in ("ReduceMean", "GlobalMaxPool")]
    assert [n["kind"] for n in reduction] == ["dense"], reduction
    original, edited, mask = _edit(1, 16, 16)
    assert_exact(compare_with_oracle(engine, ort_oracle(proto), original, edited, mask))


def test_update_cache_then_run_again():
    proto = _se_model()
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=4, backend="ort"))
    original, edited, mask = _edit(1, 16, 16)
    engine.prime(original)
    engine.run(edited, mask=mask, update_cache=True)
    again = {"x": edited["x"].copy()}
    again["x"][..., 1:4, 1:4] -= 1.0
    out = engine.run(again)
    assert engine.stats.path == "sparse"
    for o, e in zip(out, ort_oracle(proto)(again)):
        assert rel_err(o, e) <= EXACT_TOLERANCE


# ---------------------------------------------------------------------------------------------- PyTorch export


def test_mobilenet_style_backbone_from_pytorch():
    """The SE backbone of tools/bench_global_pool.py (AdaptiveAvgPool2d(1) as the dynamo exporter
    writes it) at 64 x 48: every SE pooling runs on tiles in approx mode and the first one in exact
    mode (after its gate everything is dense); exact mode equals ONNX Runtime."""
    tool = load_tool("bench_global_pool")
    module = tool.se_backbone()
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    proto = export_module(module, {"x": x})
    mask = np.zeros((64, 48), bool)
    mask[20:30, 10:22] = True
    original = {"x": x.numpy()}
    noise = np.random.default_rng(0).standard_normal(original["x"].shape).astype(np.float32)
    edited = {"x": original["x"] + np.float32(2) * mask * noise}
    pooled = {}
    for mode in ("approx", "exact"):
        engine = always_sparse(engine_from_proto(proto, mode=mode, tile_size=4, backend="ort"))
        pooled[mode] = [n for n in engine.manifest["nodes"] if n.get("note") == "incremental global pooling"]
        if mode == "exact":
            assert_exact(compare_with_oracle(engine, ort_oracle(proto), original, edited, mask))
    assert len(pooled["approx"]) == len(tool.BLOCKS) and len(pooled["exact"]) == 1, pooled


def test_bench_script_compares_with_and_without_the_rule():
    """tools/bench_global_pool.py at a toy size: both engines run sparse and agree; the rule is restored."""
    tool = load_tool("bench_global_pool")
    rules = dict(global_rules.GLOBAL_RULES)
    (row,) = tool.bench(size=32, edits=[0.05], repeats=1, threads=1, modes=["approx"], tile=4)
    assert global_rules.GLOBAL_RULES == rules
    assert row["pooled_nodes"] == len(tool.BLOCKS) and row["max_abs_diff"] < 1e-4, row
