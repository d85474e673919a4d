"""Wide convolutions on tiles run as one GEMM over the tiles' patches (passes/sparse_rules.py,
GEMM_CONV_MIN_WEIGHT_BYTES). Weights that large do not belong in tests: the threshold is lowered
to 0 so every eligible Conv takes the GEMM form, and the engine is compared with ONNX Runtime on
the original model (exact mode)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from helpers import EXACT_TOLERANCE, always_sparse, engine_from_proto, ort_oracle, rel_err
from sigec.frontends.onnx_frontend import load_onnx
from sigec.frontends.torch_frontend import export_module
from sigec.passes import sparse_rules
from sigec.passes.sparse_rewrite import rewrite


class _Net(nn.Module):
    """3x3 with bias, 1x1 without, 5x5, and a strided Conv (which keeps the Conv form)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1, bias=False)
        self.c = nn.Conv2d(8, 8, 5, padding=2)
        self.d = nn.Conv2d(8, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.d(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def _sparse_ops(proto: onnx.ModelProto, tile_size: int) -> list[str]:
    return [n.op_type for n in rewrite(load_onnx(proto), mode="exact", tile_size=tile_size).sparse.graph.node]


def _proto() -> onnx.ModelProto:
    torch.manual_seed(0)
    return export_module(_Net().eval(), torch.zeros(1, 3, 32, 32), input_names=["x"])


@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("tile_size", [2, 4])
def test_convs_as_gemm_equal_onnxruntime(monkeypatch, backend, tile_size):
    monkeypatch.setattr(sparse_rules, "GEMM_CONV_MIN_WEIGHT_BYTES", 0)
    monkeypatch.setattr(sparse_rules, "GEMM_CONV_MAX_TILE", tile_size)
    proto = _proto()
    engine = always_sparse(engine_from_proto(proto, mode="exact", tile_size=tile_size, backend=backend))
    sparse_ops = _sparse_ops(proto, tile_size)
    assert sparse_ops.count("Gemm") == 3 and sparse_ops.count("Conv") == 1, sparse_ops  # the strided one
    oracle = ort_oracle(proto)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32)).astype(np.float32)
    engine.prime({"x": x})
    edited = x.copy()
    edited[..., 9:12, 17:21] += 1.0
    out = engine.run({"x": edited})[0]
    assert engine.stats.path == "sparse"
    assert rel_err(out, oracle({"x": edited})[0]) <= EXACT_TOLERANCE


def test_narrow_convs_keep_the_conv_form():
    sparse_ops = _sparse_ops(_proto(), 2)
    assert sparse_ops.count("Conv") == 4 and "Gemm" not in sparse_ops


def test_wide_convs_on_4px_tiles_keep_the_conv_form(monkeypatch):
    monkeypatch.setattr(sparse_rules, "GEMM_CONV_MIN_WEIGHT_BYTES", 0)
    sparse_ops = _sparse_ops(_proto(), 4)
    assert sparse_ops.count("Conv") == 4 and "Gemm" not in sparse_ops


def test_gemm_weights_share_the_conv_weights_bytes_in_the_engine_file(monkeypatch, tmp_path):
    import json
    import zipfile

    import sigec
    from sigec.core.engine_file import MANIFEST_MEMBER

    monkeypatch.setattr(sparse_rules, "GEMM_CONV_MIN_WEIGHT_BYTES", 0)
    proto = _proto()
    path = sigec.compile(proto, tmp_path / "m.sigec", mode="exact", tile_size=2)
    with zipfile.ZipFile(path) as archive:
        index = {entry["name"]: entry for entry in json.loads(archive.read(MANIFEST_MEMBER))["weights"]}
    gemm = {name: entry for name, entry in index.items() if name.startswith("gemm_weight::")}
    assert len(gemm) == 3
    for name, entry in gemm.items():
        conv = index[name.removeprefix("gemm_weight::").rsplit("__", 1)[0]]
        assert (entry["offset"], entry["nbytes"]) == (conv["offset"], conv["nbytes"]) and entry["shape"] != conv["shape"]
    engine = always_sparse(sigec.load(path))
    x = np.random.default_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    engine.prime({"x": x})
    edited = x.copy()
    edited[..., 3:5, 3:5] -= 2.0
    out = engine.run({"x": edited})[0]
    assert engine.stats.path == "sparse"
    assert rel_err(out, ort_oracle(proto)({"x": edited})[0]) <= EXACT_TOLERANCE
