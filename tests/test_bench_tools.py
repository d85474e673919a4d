"""The measurement tools on tiny_local (small): the dense baseline, peak memory, the empty-edit cost."""

import json

import onnx
import pytest

import sigec
from helpers import load_tool, rel_l2
from sigec.apps.bench import EMPTY_EDIT_BUDGET, bench_engine, measure_empty_edit, onnx_dense_run
from sigec.core.errors import InputError


@pytest.fixture(scope="module")
def tiny(zoo_model, zoo_engine_path):
    """(engine path, module, example inputs) of the small tiny_local, compiled in exact mode (once per session)."""
    model = zoo_model("tiny_local")
    return zoo_engine_path("tiny_local", "exact"), model.module, model.example


def test_dense_baseline_times_every_variant_and_saves_the_fastest(tiny, tmp_path, capsys):
    engine_path, module, example = tiny
    tool = load_tool("dense_baseline")
    report = tool.main(["--model", "tiny_local", "--small", "--opsets", "18",
                        "--repeats", "1", "--engine", str(engine_path), "--json", str(tmp_path / "b.json"),
                        "--save-fastest", str(tmp_path / "fastest.onnx"), "--no-progress"])
    printed = capsys.readouterr().out
    names = [v.name for v in report.variants]
    assert names == ["PyTorch", "dynamo opset 18", "torchscript opset 18", "sigec DENSE"]
    for v in report.variants:
        assert v.rel_l2 < 1e-3, (v.name, v.rel_l2)
        assert len(v.times_ms) == 1 and v.median_ms > 0
        assert f"| {v.name}" in printed
    assert report.failures == []
    assert {v.opset for v in report.variants if v.exporter != "pytorch"} == {18}
    assert report.fastest is not None and report.fastest.exporter != "pytorch"
    assert "x fastest" in printed and f"{report.fastest.name} (fastest)" in printed

    data = json.loads((tmp_path / "b.json").read_text())
    assert data["fastest"] == report.fastest.name
    assert all(v["matches"] and v["rel_l2_vs_pytorch"] < 1e-3 for v in data["variants"])
    assert min(v["ratio_to_fastest"] for v in data["variants"]) == pytest.approx(1.0)

    # The saved model is self-contained and runs as bench's dense baseline.
    saved = onnx.load(str(tmp_path / "fastest.onnx"))
    assert saved.graph.initializer and all(t.data_location != onnx.TensorProto.EXTERNAL for t in saved.graph.initializer)
    engine = sigec.load(engine_path, threads=1)
    run = onnx_dense_run(tmp_path / "fastest.onnx", 1, engine.input_names)
    original = {k: v.numpy() for k, v in example.items()}
    out, ref = run(original)[0], engine.run_dense(original)[0]
    assert rel_l2(out, ref) < 1e-5



def test_dense_baseline_in_groups_times_each_variant_against_the_reference(tiny, capsys):
    """--group-size 2: one variant at a time next to sigec's DENSE graph, sessions closed in between."""
    engine_path, _, _ = tiny
    tool = load_tool("dense_baseline")
    report = tool.main(["--model", "tiny_local", "--small", "--opsets", "18", "--repeats", "2",
                        "--engine", str(engine_path), "--group-size", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert report.reference == "sigec DENSE" and "Timed in round-robin groups" in printed
    reference = next(v for v in report.variants if v.exporter == "sigec")
    assert len(reference.times_ms) == 2 * 3, "the reference runs in each of the three groups"
    for v in report.variants:
        assert v.rel_l2 < 1e-3 and v.median_ms > 0
        if v is not reference:
            assert len(v.times_ms) == 2 and v.ratio_to_reference is not None
            assert v.median_ms == pytest.approx(v.ratio_to_reference * reference.median_ms)


def test_an_export_that_silently_keeps_another_opset_is_a_failure(tmp_path):
    import torch
    import torch.nn.functional as F

    class Padded(torch.nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 1, 1, 1)) * 2

    tool = load_tool("dense_baseline")
    example = {"x": torch.randn(1, 2, 4, 4)}
    # The dynamo exporter has no Pad adapter down to opset 17 and keeps opset 18 (with a log line only).
    with pytest.raises(RuntimeError, match="produced opset 18 instead of 17"):
        tool.export(Padded(), example, "dynamo", 17, tmp_path / "d.onnx")
    assert tool.export(Padded(), example, "torchscript", 17, tmp_path / "t.onnx").opset_import[0].version == 17


def test_parse_opsets():
    tool = load_tool("dense_baseline")
    assert tool.parse_opsets("17-19,23") == [17, 18, 19, 23]
    assert tool.parse_opsets("18") == [18]
    with pytest.raises(Exception, match="bad opset list"):
        tool.parse_opsets("x-19")


def test_onnx_dense_run_rejects_a_model_with_other_inputs(tiny, tmp_path):
    engine_path, _, _ = tiny
    engine = sigec.load(engine_path, threads=1)
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Add", ["a", "b"], ["y"])], "two_inputs",
        [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1]) for n in ("a", "b")],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    onnx.save(model, str(tmp_path / "other.onnx"))
    with pytest.raises(InputError, match="do not match the engine's inputs"):
        onnx_dense_run(tmp_path / "other.onnx", 1, engine.input_names)


def test_peak_memory_counts_the_caches(tiny, capsys):
    engine_path, _, _ = tiny
    tool = load_tool("peak_memory")
    results = tool.main([str(engine_path), "--threads", "1"])[str(engine_path)]
    dense, sparse = results["dense"], results["sparse"]
    assert dense["peak_increase"] > 0 and sparse["peak_increase"] > 0
    assert sparse["cache_bytes"] == sigec.load(engine_path).expected_entry_bytes() > 0 and sparse["peak_increase"] >= sparse["cache_bytes"]
    assert sparse["path"] == "sparse"
    # Each figure comes from its own process: the baselines are separate measurements.
    assert dense["peak"] >= dense["rss_after_load"] >= dense["rss_after_imports"] > 0
    printed = capsys.readouterr().out
    assert "| dense ORT (engine's DENSE graph, one run) |" in printed and "| sigec (load, prime 1 key" in printed


def test_empty_edit_costs_a_small_fraction_of_dense(tiny, capsys):
    engine_path, _, example = tiny
    engine = sigec.load(engine_path, threads=1)
    original = {k: v.numpy() for k, v in example.items()}
    empty = measure_empty_edit(engine, original, repeats=3, inner=5)
    assert empty.path == "empty"
    assert 0 < empty.empty_ms < empty.dense_ms
    assert empty.within_budget == (empty.fraction <= EMPTY_EDIT_BUDGET)
    assert f"= {empty.fraction * 100:.3f}% of dense" in empty.line()

    bench_engine(str(engine_path), edits=[0.05], repeats=1, threads=1)
    printed = capsys.readouterr().out
    assert "Empty edit (`engine.run(original, mask=all False)`, path empty):" in printed
    assert "% of dense" in printed
