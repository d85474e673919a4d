"""The zoo's mobile text detector (``mobile_det``, issue 13): MobileNetV3-style backbone with ten
squeeze-excitation (SE) blocks, DBFPN neck, DB head; small variant (64x64, scale 0.25, FPN 32).

Checked: the zoo conventions and the layout (full size on the meta device: 1.91 GMACs, ten SE
blocks); the export against PyTorch; engines compiled from the exported file (the full pipeline,
engine file included, ONNX Runtime backend, sparse path forced) against ONNX Runtime on that file:

- exact mode: equal to ``EXACT_TOLERANCE`` (``assert_exact``); the first SE pooling (at 1/4) runs
  on tiles (incremental global pooling), everything after its gate is dense, as exact mode keeps
  whatever a global value reaches;
- approx mode: all ten SE poolings are rewritten by the incremental global pooling rule, the SE
  gates are the listed approximations, the SPARSE graph scatters only the model output, and the
  error is bounded (``assert_approx``): measured on this edit (default approx options: the mask
  dilated by 1 px, 1 cell per resolution), the sparse run's relative L2 error is 0.004x that of not
  recomputing inside the edit and 0.90x over the whole map (the edit changes every SE gate, and
  approx mode applies the new gates on the active tiles only); bounds 0.05 and 0.95.

Also: tools/profile_nodes.py (the per-node profile of BENCHMARKS.md, "Mobile detector") on the
small approx engine: its groups find the ten SE pooling chains and the ten SE gates.

The model is exported once per module (about 15 s on the shared 2-core machine) and compiled once per
mode (about a second each).
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sigec
from helpers import ALWAYS_SPARSE, assert_approx, assert_exact, compare_with_oracle, load_tool, ort_oracle, rel_l2
from sigec.apps import zoo
from sigec.apps.zoo.mobile_det import BLOCKS, SE_EXTRA, MobileDet, SqueezeExcite
from sigec.core.engine_file import read_engine
from sigec.frontends.torch_frontend import export_module

POOLING_NOTE = "incremental global pooling"
SE_BLOCKS = 10
APPROX_INSIDE = 0.05  # measured 0.004 (sparse / not recomputing, relative L2 inside the edit)
APPROX_WHOLE = 0.95  # measured 0.900 (whole probability map)


@pytest.fixture(scope="module")
def small() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    return zoo.build("mobile_det", small=True)


@pytest.fixture(scope="module")
def onnx_path(small, tmp_path_factory) -> Path:
    """The small model exported once (dynamo exporter, opset 18)."""
    module, example = small
    path = tmp_path_factory.mktemp("mobile_det") / "mobile_det_small.onnx"
    onnx.save(export_module(module, example), path)
    return path


@pytest.fixture(scope="module")
def edit(small) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
    """The example image and a copy with noise in a 12 x 14 box (4% of the image; tiles at every scale)."""
    _, example = small
    x = example["image"].numpy()
    mask = np.zeros(x.shape[-2:], bool)
    mask[24:36, 20:34] = True
    noise = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    return {"image": x}, {"image": x + np.float32(0.8) * mask * noise}, mask


@pytest.fixture(scope="module")
def engine_paths(onnx_path, tmp_path_factory) -> dict[str, Path]:
    """The export compiled into engine files (default options) in both modes."""
    folder = tmp_path_factory.mktemp("mobile_det_engines")
    return {mode: sigec.compile(onnx_path, folder / f"mobile_det_{mode}.sigec", mode=mode)
            for mode in ("exact", "approx")}


def _engine(path: Path) -> sigec.Engine:
    """The engine file loaded on ONNX Runtime (1 thread), always sparse."""
    engine = sigec.load(path, threads=1)
    engine.dense_fallback_fraction = ALWAYS_SPARSE
    return engine


def _pooling(engine: sigec.Engine) -> list[dict]:
    return [n for n in engine.manifest["nodes"] if n["op_type"] in ("ReduceMean", "GlobalAveragePool")]


# ---------------------------------------------------------------------------------------------- the factory


def test_factory_follows_the_zoo_conventions(small):
    module, example = small
    assert not module.training and list(example) == ["image"]
    assert example["image"].shape == (1, 3, 64, 64)
    assert float(example["image"].min()) >= -1 and float(example["image"].max()) <= 1
    assert sum(isinstance(m, SqueezeExcite) for m in module.modules()) == SE_BLOCKS
    with torch.no_grad():
        out = module(**example)
    assert out.shape == (1, 1, 64, 64)
    assert float(out.min()) > 0 and float(out.max()) < 1  # a probability map
    assert float(out.std()) > 0.05, "the map must not be flat"
    again, _ = zoo.build("mobile_det", small=True)
    other, _ = zoo.build("mobile_det", small=True, seed=1)
    with torch.no_grad():
        assert torch.equal(again(**example), out)
        assert not torch.allclose(other(**example), out)
    _, batch2 = zoo.build("mobile_det", small=True, batch=2)
    assert batch2["image"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        zoo.build("mobile_det", small=True, size=48)


def test_full_size_layout():
    """On the meta device (shapes only): 1x3x640x640 -> 1x1x640x640, 1.91 GMACs, ten SE blocks, the
    stage widths of MobileNetV3-large x0.5 as PP-OCR's detection backbone returns them."""
    assert sum(se for *_, se, _, _ in BLOCKS) + len(SE_EXTRA) == SE_BLOCKS
    with torch.device("meta"):
        module = MobileDet().eval()
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            out = module(torch.empty(1, 3, 640, 640))
    assert out.shape == (1, 1, 640, 640)
    assert abs(counter.get_total_flops() / 2 - 1.906e9) < 0.01e9
    assert module.backbone.out_channels == [16, 24, 56, 480]
    assert sum(isinstance(m, SqueezeExcite) for m in module.modules()) == SE_BLOCKS


def test_export_matches_pytorch(small, onnx_path):
    module, example = small
    proto = onnx.load(onnx_path)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    pools = ops["ReduceMean"] + ops["GlobalAveragePool"]
    assert (pools, ops["HardSigmoid"], ops["Mul"]) == (SE_BLOCKS, SE_BLOCKS, SE_BLOCKS), ops
    assert (ops["ConvTranspose"], ops["Resize"], ops["Concat"], ops["Sigmoid"]) == (2, 6, 1, 1), ops
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"image": example["image"].numpy()})
    with torch.no_grad():
        expected = module(**example).numpy()
    assert rel_l2(actual, expected) < 1e-5


# ---------------------------------------------------------------------------------------------- engines


def test_exact_mode_equals_onnx_runtime(onnx_path, engine_paths, edit):
    engine = _engine(engine_paths["exact"])
    rewritten = [n for n in _pooling(engine) if n.get("note") == POOLING_NOTE]
    assert len(rewritten) == 1 and rewritten[0]["kind"] == "sparse", _pooling(engine)
    assert rewritten[0]["resolution"] == "r16x16"  # the first SE block, at 1/4; after its gate all is dense
    original, edited, mask = edit
    comparison = compare_with_oracle(engine, ort_oracle(onnx.load(onnx_path)), original, edited, mask)
    assert_exact(comparison, context="mobile_det exact")


def test_approx_mode_pools_incrementally_within_bounds(onnx_path, engine_paths, edit):
    engine = _engine(engine_paths["approx"])
    pooling = _pooling(engine)
    assert len(pooling) == SE_BLOCKS
    assert all(n["kind"] == "sparse" and n.get("note") == POOLING_NOTE for n in pooling), pooling
    approximated = collections.Counter(a["op_type"] for a in engine.manifest["approximations"])
    assert approximated == {"mask": 1, "Mul": SE_BLOCKS}, approximated  # the SE gates on active tiles
    sparse = onnx.ModelProto.FromString(read_engine(engine_paths["approx"]).graphs["sparse"])
    ops = collections.Counter(n.op_type for n in sparse.graph.node)
    # only the model output is scattered: no pooling (nor anything else) reads a full map
    assert ops["TileScatter"] == 1 and ops["ReduceMean"] + ops["GlobalAveragePool"] == 0, ops
    original, edited, mask = edit
    comparison = compare_with_oracle(engine, ort_oracle(onnx.load(onnx_path)), original, edited, mask)
    assert_approx(comparison, inside=APPROX_INSIDE, whole=APPROX_WHOLE, context="mobile_det approx")


def test_profile_nodes_tool_groups_the_se_blocks(engine_paths, capsys):
    tool = load_tool("profile_nodes")
    profile = tool.profile(engine_paths["approx"], edit=0.05, runs=2, threads=1)
    assert profile.kernel_ms > 0 and profile.engine_nodes > 0
    groups = tool.groups(profile)
    assert sum(sum(ops.values()) for _, ops in groups.values()) >= len(profile.median_ms)  # every node somewhere
    pooling = next(ops for name, (_, ops) in groups.items() if name.startswith("incremental pooling"))
    assert (pooling["TileGather"], pooling["Sub"], pooling["ReduceSum"]) == (SE_BLOCKS, SE_BLOCKS, 2 * SE_BLOCKS)
    gates = next(ops for name, (_, ops) in groups.items() if name.startswith("SE gate Mul"))
    assert (gates["Mul"], gates["TileGather"]) == (SE_BLOCKS, SE_BLOCKS)
    assert tool.main([str(engine_paths["approx"]), "--runs", "1", "--threads", "1", "--edit", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "| group |" in printed and "ReorderInput after TileGather" in printed
