"""Shared fixtures: exported test models are built once per session."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# Triton's CPU interpreter must be chosen before triton is first imported, whichever test module
# imports it first; SIGEC_TEST_DEVICE=cuda (tools/gpu_check.sh) runs the kernels compiled on a GPU.
if os.environ.setdefault("SIGEC_TEST_DEVICE", "cpu") == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


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
