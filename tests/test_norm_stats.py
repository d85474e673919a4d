"""Updated normalisation statistics (passes/norm_stats.py, ``norm_stats="updated"``) against frozen ones.

Models: x [B, 3, H, W] -> conv 3x3 (with a bias) = h -> GroupNorm / InstanceNorm (affine) = y -> SiLU ->
conv 3x3 = out; outputs ``y`` (the normalised map, written by a TileScatter of its tiles) and ``out``
(which reads ``y`` through the normalisation fused into its gather, halo included). Spellings: PyTorch's
GroupNorm and InstanceNorm2d as the dynamo exporter writes them, and ONNX GroupNormalization (opset 21,
per-channel scale and bias) built with onnx.helper. Geometries: batch 1 on a map of whole tiles, and batch 2
on a 13 x 18 map (partial bottom/right tiles) with a different edit per batch item, one of them touching
the partial corner tiles.

The edit adds an offset inside a region, so it moves the group statistics. In approx mode with a 3x3 conv
and the default 1-px dilation, ``h`` outside the active tiles equals the original, so updated statistics
are the dense statistics of the edited map: on the active tiles both outputs equal ONNX Runtime on the
original model to ``EXACT_TOLERANCE`` (max-abs relative to the largest magnitude there). Frozen statistics
miss the change there by far more. Every run is on the sparse path (forced).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper
from onnx import numpy_helper as nh

from helpers import (EXACT_TOLERANCE, always_sparse, assert_approx, compare_with_oracle, engine_from_proto,
                     load_tool, ort_oracle, rel_err)
from sigec.core.errors import CompileError
from sigec.frontends.onnx_frontend import load_onnx
from sigec.frontends.torch_frontend import export_module
from sigec.passes import build_sparse_graph
from sigec.passes.sparse_rewrite import rewrite

C, GROUPS, TILE = 8, 4, 4
GEOMETRIES = {  # (batch, height, width)
    "whole_tiles": (1, 16, 16),
    "partial_tiles_batch2": (2, 13, 18),
}
UPDATED_NOTE = "normalisation with statistics updated from the active tiles"


class NormBlock(torch.nn.Module):
    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.conv0 = torch.nn.Conv2d(3, C, 3, padding=1)
        self.norm = norm
        self.conv1 = torch.nn.Conv2d(C, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.norm(self.conv0(x))
        return y, self.conv1(torch.nn.functional.silu(y))


def _torch_model(norm: str, batch: int, height: int, width: int) -> onnx.ModelProto:
    torch.manual_seed(0)
    layer = torch.nn.GroupNorm(GROUPS, C) if norm == "group_norm" else torch.nn.InstanceNorm2d(C, affine=True)
    module = NormBlock(layer).eval()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return export_module(module, {"x": torch.randn(batch, 3, height, width)})


def _onnx_group_normalization(batch: int, height: int, width: int) -> onnx.ModelProto:
    """The same block with ONNX GroupNormalization (opset 21: scale and bias per channel)."""
    rng = np.random.default_rng(1)
    w = lambda *s: (rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32)  # noqa: E731
    inits = {"w0": w(C, 3, 3, 3), "b0": w(C) + 0.5, "gs": rng.uniform(0.5, 1.5, C).astype(np.float32),
             "gb": rng.uniform(-0.5, 0.5, C).astype(np.float32), "w1": w(4, C, 3, 3), "b1": w(4)}
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["h", "gs", "gb"], ["y"], num_groups=GROUPS, epsilon=1e-5),
             helper.make_node("Sigmoid", ["y"], ["sig"]),
             helper.make_node("Mul", ["y", "sig"], ["act"]),
             helper.make_node("Conv", ["act", "w1", "b1"], ["out"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "norm_block", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT,
                                                                                  [batch, 3, height, width])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, C, height, width]),
                               helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [batch, 4, height, width])],
                              initializer=[nh.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


SPELLINGS = {
    "torch_group_norm": lambda *g: _torch_model("group_norm", *g),
    "torch_instance_norm": lambda *g: _torch_model("instance_norm", *g),
    "onnx_group_normalization": _onnx_group_normalization,
}


def _inputs(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    return {proto.graph.input[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def _edit(original: dict[str, np.ndarray], mask: np.ndarray, offset: float = 2.0) -> dict[str, np.ndarray]:
    """``original`` plus noise and ``offset`` inside ``mask`` [B, H, W] (the offset moves the group means)."""
    (name, x), = original.items()
    noise = np.random.default_rng(5).standard_normal(x.shape).astype(np.float32)
    return {name: (x + mask[:, None] * (offset + noise)).astype(np.float32)}


def _mask(batch: int, height: int, width: int) -> np.ndarray:
    """Batch item 0: a square at the bottom-right corner (the partial tiles when the map has them);
    item 1: a different square inside the map."""
    mask = np.zeros((batch, height, width), bool)
    mask[0, height - 4:, width - 5:] = True
    if batch > 1:
        mask[1, 2:6, 3:8] = True
    return mask


def _active(engine, mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Boolean [B, C, H, W]: the pixels of the active tiles of the output's resolution."""
    tiles = engine.expected_macs(mask)[2][f"r{shape[2]}x{shape[3]}"]
    tile_px = np.repeat(np.repeat(tiles.grid >= 0, TILE, axis=1), TILE, axis=2)[:, :shape[2], :shape[3]]
    return np.broadcast_to(tile_px[:, None], shape)


def _errors_on_active_tiles(engine, proto, original, edited, mask) -> list[float]:
    engine.prime(original)
    outputs = engine.run(edited, mask=mask)
    assert engine.stats.path == "sparse"
    expected = ort_oracle(proto)(edited)
    errors = []
    for out, exp in zip(outputs, expected):
        active = _active(engine, mask, exp.shape)
        assert 0 < active.mean() < 1  # some tiles, not all: the check is about the active ones
        errors.append(rel_err(out[active], exp[active]))
    return errors


def _engine(proto: onnx.ModelProto, norm_stats: str, backend: str = "ort"):
    """Approx mode, sparse path forced; float32 caches (half caches would round the halo reads)."""
    return always_sparse(engine_from_proto(proto, mode="approx", tile_size=TILE, backend=backend,
                                           norm_stats=norm_stats, cache_dtype="float32"))


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_updated_statistics_equal_the_dense_ones(spelling, geometry):
    batch, height, width = GEOMETRIES[geometry]
    proto = SPELLINGS[spelling](batch, height, width)
    original = _inputs(proto)
    mask = _mask(batch, height, width)
    edited = _edit(original, mask)
    updated = _engine(proto, "updated")
    assert {n["note"] for n in updated.manifest["nodes"] if n["kind"] == "approx"} == {UPDATED_NOTE}
    errors = _errors_on_active_tiles(updated, proto, original, edited, mask)
    assert max(errors) <= EXACT_TOLERANCE, errors
    frozen = _engine(proto, "frozen")
    frozen_errors = _errors_on_active_tiles(frozen, proto, original, edited, mask)
    assert min(frozen_errors) > 100 * EXACT_TOLERANCE, frozen_errors  # frozen statistics miss the change
    c = compare_with_oracle(updated, ort_oracle(proto), original, edited, mask)
    assert_approx(c, inside=0.01, whole=1.0, context=spelling)


def test_torch_backend_runs_the_rule():
    batch, height, width = GEOMETRIES["partial_tiles_batch2"]
    proto = SPELLINGS["torch_group_norm"](batch, height, width)
    original = _inputs(proto)
    mask = _mask(batch, height, width)
    errors = _errors_on_active_tiles(_engine(proto, "updated", backend="torch"), proto, original,
                                     _edit(original, mask), mask)
    assert max(errors) <= EXACT_TOLERANCE, errors


def test_update_cache_updates_the_statistics():
    """After ``run(update_cache=True)`` the cached moments are the edited map's (whole-cache updates), so a
    second edit on top of the first one is again exact on its active tiles; without the moments'
    update the second run would start from the original's statistics and miss the first edit."""
    batch, height, width = GEOMETRIES["partial_tiles_batch2"]
    proto = SPELLINGS["torch_group_norm"](batch, height, width)
    engine = _engine(proto, "updated")
    whole = {u["cache"] for u in engine.manifest["updates"] if u.get("whole")}
    assert {c for c in whole if c.startswith("cache::stats::")} == {
        c["name"] for c in engine.manifest["caches"] if c["kind"] == "stats"} and len(whole) == 2
    original = _inputs(proto)
    mask = _mask(batch, height, width)
    first = _edit(original, mask)
    engine.prime(original)
    engine.run(first, mask=mask, update_cache=True)
    second_mask = np.zeros_like(mask)
    second_mask[:, 1:4, 1:5] = True
    second = _edit(first, second_mask, offset=-1.5)
    outputs = engine.run(second, mask=second_mask)
    assert engine.stats.path == "sparse"
    for out, exp in zip(outputs, ort_oracle(proto)(second)):
        active = _active(engine, second_mask, exp.shape)
        assert rel_err(out[active], exp[active]) <= EXACT_TOLERANCE


def test_the_caches_are_moments_for_updated_and_scale_shift_for_frozen():
    batch, height, width = GEOMETRIES["partial_tiles_batch2"]
    proto = SPELLINGS["onnx_group_normalization"](batch, height, width)
    stats = {}
    for norm_stats in ("frozen", "updated"):
        result = rewrite(load_onnx(proto), mode="approx", tile_size=TILE, norm_stats=norm_stats)
        stats[norm_stats] = {c["name"]: c["shape"] for c in result.manifest["caches"] if c["kind"] == "stats"}
        full_outputs = {o.name for o in result.full.graph.output}
        assert {c["source"] for c in result.manifest["caches"] if c["kind"] == "stats"} <= full_outputs
        details = " ".join(a["detail"] for a in result.manifest["approximations"])
        assert ("updated from the active tiles" in details) == (norm_stats == "updated"), details
    assert stats["frozen"] == {"cache::stats::scale::h": [batch, C], "cache::stats::shift::h": [batch, C]}
    assert stats["updated"] == {"cache::stats::mean::h": [batch, GROUPS, 1], "cache::stats::var::h": [batch, GROUPS, 1]}


def test_a_model_input_keeps_frozen_statistics_beside_updated_ones():
    """Normalising the model input itself (a Dense value, no cached tiles of its own) keeps frozen statistics,
    with the reason; the next normalisation (of a conv's output) is updated. FULL then computes a frozen
    scale/shift and SPARSE an updated one: their constants must not share names (the engine keeps one
    weight per name), and the engine runs."""
    rng = np.random.default_rng(2)
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, C, 8, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, C, 8, 8])
    inits = {"s": rng.uniform(0.5, 1.5, C), "b": rng.uniform(-0.5, 0.5, C), "w": rng.standard_normal((C, C, 3, 3)) / 9,
             "gs": rng.uniform(0.5, 1.5, C), "gb": rng.uniform(-0.5, 0.5, C)}
    nodes = [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["n0"]),
             helper.make_node("Conv", ["n0", "w"], ["h"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["h", "gs", "gb"], ["y"], num_groups=GROUPS)]
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=[nh.from_array(v.astype(np.float32), k)
                                                                 for k, v in inits.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    engine = _engine(proto, "updated")
    notes = {n["op_type"]: n["note"] for n in engine.manifest["nodes"] if n["kind"] == "approx"}
    assert notes["InstanceNormalization"].startswith("normalisation with frozen statistics (no updated statistics:")
    assert notes["GroupNormalization"] == UPDATED_NOTE
    original = {"x": rng.standard_normal((1, C, 8, 8)).astype(np.float32)}
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 5:, 5:] = True
    engine.prime(original)
    engine.run(_edit(original, mask), mask=mask)
    assert engine.stats.path == "sparse"


def test_the_option_is_checked_and_recorded(tmp_path):
    import sigec
    from sigec.cli import build_parser
    from sigec.core.options import DEFAULT_NORM_STATS, NORM_STATS

    proto = SPELLINGS["onnx_group_normalization"](1, 8, 8)
    with pytest.raises(CompileError, match="norm_stats"):
        rewrite(load_onnx(proto), mode="approx", norm_stats="thawed")
    with pytest.raises(CompileError, match="norm_stats"):
        sigec.compile(proto, tmp_path / "bad.sigec", norm_stats="thawed")
    path = sigec.compile(proto, tmp_path / "m.sigec", mode="approx", norm_stats="updated")
    assert sigec.load(path).manifest["options"]["norm_stats"] == "updated"
    assert DEFAULT_NORM_STATS in NORM_STATS
    args = build_parser().parse_args(["compile", "m.onnx", "-o", "m.sigec", "--norm-stats", "updated"])
    assert args.norm_stats == "updated"
    assert build_parser().parse_args(["compile", "m.onnx", "-o", "m.sigec"]).norm_stats == DEFAULT_NORM_STATS


def test_the_bench_tool_at_a_toy_size():
    """tools/norm_stats_bench.py on the small UNet: a row per edit with both engines' figures; the
    ``--updated-first`` experiment counts the normalisations and restores the decision table."""
    tool = load_tool("norm_stats_bench")
    section = tool.run("ddpm_unet", [0.05], repeats=1, dense_repeats=1, threads=1, small=True, size=None)
    (row,) = [line for line in section.splitlines() if line.startswith("| 5.0% |")]
    assert len(row.split("|")) == 12, row
    decisions = build_sparse_graph.DECISIONS
    table = tool.updated_first("ddpm_unet", [0, 1], [0.05], threads=1, small=True, size=None)
    assert build_sparse_graph.DECISIONS is decisions
    counts = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| first")]
    assert counts == ["first 0 of 23", "first 1 of 23"], table
