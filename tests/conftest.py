"""Shared fixtures: exported test models are built once per session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def small_unet_onnx(tmp_path_factory):
    """The small UNet exported to an .onnx file (dynamo exporter, opset 18)."""
    from sigec.frontends.torch_frontend import export_module
    from small_unet import small_unet

    model, x = small_unet()
    path = tmp_path_factory.mktemp("models") / "small_unet.onnx"
    import onnx

    onnx.save(export_module(model, {"x": x}), path)
    return path
