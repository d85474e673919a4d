"""Autotuning (sigec.autotune) and the per-resolution profile it reads (sigec.runtime.profiling)."""

import onnx
import pytest

import sigec
from helpers import ALWAYS_SPARSE, assert_exact, compare_with_oracle, ort_oracle
from sigec.autotune import DENSE, choose, plan_from_choice, resolution_costs, total_cost
from sigec.core.engine_file import read_manifest
from sigec.core.errors import CompileError
from sigec.runtime.profiling import EngineProfile, GraphProfile, node_resolutions, profile_engine


def _profile(sparse: dict[str, float], dense: dict[str, float], fractions: dict[str, float]) -> EngineProfile:
    return EngineProfile(edit=0.1, sparse=GraphProfile(by_op={"Conv": sum(sparse.values())}, by_resolution=sparse),
                         dense=GraphProfile(by_op={"Conv": sum(dense.values())}, by_resolution=dense),
                         sparse_wall_ms=0.0, active_fraction=fractions, active_tiles={}, mac_reduction=1.0)


def test_choice_per_resolution_from_measured_costs():
    fractions = {"r64x64": 0.1, "r8x8": 1.0}
    dense = {"r64x64": 100.0, "r8x8": 4.0}
    profiles = {
        4: [_profile({"r64x64": 10.0, "r8x8": 6.0}, dense, fractions)],
        8: [_profile({"r64x64": 14.0, "r8x8": 5.0}, dense, fractions)],
    }
    costs = resolution_costs(profiles, allow_dense=True)
    assert costs["r64x64"] == pytest.approx({4: 10 / 16, 8: 14 / 16, DENSE: 100 / 16})
    choice = choose(costs)
    assert choice == {"r64x64": 4, "r8x8": DENSE}
    plan = plan_from_choice(choice, default_tile=4)
    assert plan.tile_size == {"r64x64": 4, "default": 4} and plan.dense_resolutions == ["r8x8"]
    assert choose(resolution_costs(profiles, allow_dense=False)) == {"r64x64": 4, "r8x8": 8}
    assert total_cost(profiles[8], profiles[4]) == pytest.approx(19 / 16)


def test_sparse_nodes_are_attributed_to_the_resolution_of_their_tiles():
    h = onnx.helper
    graph = h.make_graph(
        [h.make_node("TileGather", ["base", "", "", "tiles::coords::r16x16"], ["g"], domain="ai.sigec", name="gather"),
         h.make_node("Conv", ["g", "w"], ["c"], name="conv"),
         h.make_node("Relu", ["c"], ["r"], name="relu"),
         h.make_node("Shape", ["w"], ["s"], name="shape")],
        "g", [h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("base", "w")] +
        [h.make_tensor_value_info("tiles::coords::r16x16", onnx.TensorProto.INT64, None)],
        [h.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None)])
    resolutions = node_resolutions(h.make_model(graph))
    assert resolutions == {"gather": "r16x16", "conv": "r16x16", "relu": "r16x16"}
    seeded = node_resolutions(h.make_model(graph), seeds={"shape": "r8x8"}, value_seeds={"w": "r32x32"})
    assert seeded["shape"] == "r8x8"


def test_profile_covers_the_sparse_and_dense_graphs(zoo_engine_path):
    result = profile_engine(zoo_engine_path("tiny_local", "exact"), edit=0.1, runs=1, threads=1)
    assert result.sparse.total_ms > 0 and result.dense.total_ms > 0
    assert set(result.active_fraction) <= set(result.sparse.by_resolution)
    assert sum(result.sparse.by_resolution.values()) == pytest.approx(result.sparse.total_ms)
    assert "TileGather" in result.sparse.by_op and "TileGather" not in result.dense.by_op


def test_autotuned_engine_records_its_choice_and_stays_exact(zoo_model, tmp_path):
    model = zoo_model("tiny_local")
    path = sigec.compile(model.proto, tmp_path / "tuned.sigec", mode="exact", autotune=True,
                         autotune_edits=(0.1,), autotune_threads=1)
    manifest = read_manifest(path)
    record = manifest["options"]["autotune"]
    assert record["candidates"] == [4, 8] and record["edits"] == [0.1]
    assert DENSE not in record["choice"].values(), "exact mode never chooses dense resolutions"
    assert manifest["options"]["tile_size"] == record["plan"]["tile_size"]
    chosen = record["plan"]["tile_size"]
    for res in manifest["resolutions"]:
        assert res["tile"] == chosen.get(res["name"], chosen["default"])
    engine = sigec.load(path, threads=1, dense_fallback_fraction=ALWAYS_SPARSE)
    edited = {k: v.copy() for k, v in model.inputs.items()}
    edited["image"][..., 3:9, 5:11] += 1.0
    assert_exact(compare_with_oracle(engine, ort_oracle(model.proto), model.inputs, edited), context="autotuned")


def test_autotune_refuses_fixed_choices(zoo_model, tmp_path):
    proto = zoo_model("tiny_local").proto
    with pytest.raises(CompileError, match="autotune chooses"):
        sigec.compile(proto, tmp_path / "x.sigec", autotune=True, tile_size=4)
    with pytest.raises(CompileError, match="edit sizes"):
        sigec.compile(proto, tmp_path / "x.sigec", autotune=True, autotune_edits=(1.5,))
    assert not (tmp_path / "x.sigec").exists()
