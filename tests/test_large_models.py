"""Models over protobuf's 2 GiB compile: no step serialises the weights' bytes (passes/weightless.py).

A model that size does not belong in the tests; instead every weight of a small model (initializers
over SHAPE_CONSTANT_BYTES: smaller constants may decide shapes and are serialised for onnx shape
inference) counts how often its bytes are serialised (``tobytes``, which ``onnx_ir`` calls to write a TensorProto's
raw data), and a compile must not serialise any. External-data files stay on disk until read.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from torch import nn

import sigec
from helpers import rel_err
from sigec.core.errors import CompileError
from sigec.frontends.onnx_frontend import SHAPE_CONSTANT_BYTES, load_onnx
from sigec.frontends.torch_frontend import export_module_ir

EXACT_TOLERANCE = 1e-5  # relative L2, sparse engine vs ONNX Runtime on the original model


class _CountingTensor(ir.Tensor):
    """An ``ir.Tensor`` that counts how often its bytes are serialised."""

    serialised = 0

    def tobytes(self) -> bytes:
        type(self).serialised += 1
        return super().tobytes()


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _example() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _edit(x: np.ndarray) -> np.ndarray:
    edited = x.copy()
    edited[..., 10:13, 20:24] += 1.0
    return edited


def _check_engine(path: os.PathLike, x: np.ndarray, expected_of) -> None:
    engine = sigec.load(path)
    engine.dense_fallback_fraction = float("inf")
    engine.prime({"x": x})
    edited = _edit(x)
    out = engine.run({"x": edited})[0]
    assert engine.stats.path == "sparse"
    assert rel_err(out, expected_of(edited)) <= EXACT_TOLERANCE


def test_compiling_an_in_memory_model_serialises_no_weight(tmp_path):
    torch.manual_seed(0)
    net = _Net().eval()
    model = export_module_ir(net, _example(), input_names=["x"])
    weights = [v for v in model.graph.initializers.values() if v.const_value.nbytes > SHAPE_CONSTANT_BYTES]
    assert len(weights) == 3
    for value in weights:
        value.const_value = _CountingTensor(value.const_value.numpy().copy(), name=value.name)
    _CountingTensor.serialised = 0
    path = sigec.compile(model, tmp_path / "m.sigec", mode="exact")
    assert _CountingTensor.serialised == 0
    x = _example().numpy()
    with torch.no_grad():
        _check_engine(path, x, lambda e: net(torch.from_numpy(e)).numpy())


def _external_data_model(tmp_path) -> tuple[str, onnx.ModelProto]:
    torch.manual_seed(0)
    proto = ir.to_proto(export_module_ir(_Net().eval(), _example(), input_names=["x"]))
    path = os.fspath(tmp_path / "ext.onnx")
    onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    return path, proto


def test_external_data_stays_on_disk_and_the_engine_matches_onnxruntime(tmp_path):
    path, proto = _external_data_model(tmp_path)
    canonical = load_onnx(path)
    weights = [v.const_value for v in canonical.graph.initializers.values() if v.const_value.nbytes > SHAPE_CONSTANT_BYTES]
    assert weights and all(isinstance(t, ir.ExternalTensor) for t in weights)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    engine_path = sigec.compile(path, tmp_path / "ext.sigec", mode="exact")
    _check_engine(engine_path, _example().numpy(), lambda e: session.run(None, {"x": e})[0])


def test_a_missing_external_data_file_names_the_weight_and_the_file(tmp_path):
    path, _ = _external_data_model(tmp_path)
    os.remove(tmp_path / "ext.onnx.data")
    with pytest.raises(CompileError, match=r"weight '.+' .* external data file 'ext.onnx.data', which does not exist"):
        sigec.compile(path, tmp_path / "ext.sigec", mode="exact")


def test_weightless_serialisation_keeps_every_weight_and_its_shape():
    from sigec.passes.weightless import weightless_proto

    graph = ir.Graph([], [], nodes=[], name="g", opset_imports={"": 18})
    arrays = {"scalar": np.array(3, np.int64), "matrix": np.arange(6, dtype=np.float32).reshape(2, 3)}
    for name, array in arrays.items():
        graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(array, name=name)))
    proto, weights = weightless_proto(ir.Model(graph, ir_version=10))
    assert len(proto.graph.initializer) == 0
    assert set(weights) == set(arrays)
    for name, array in arrays.items():
        assert weights[name].shape == array.shape and np.array_equal(weights[name], array), name
    assert graph.initializers["scalar"].const_value is not None  # put back after serialising
