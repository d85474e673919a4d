"""The PyTorch frontend: factory loading from a CLI spec and export to ONNX."""

from __future__ import annotations

import textwrap
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from helpers import ort_oracle, rel_l2
from sigec.core.errors import CompileError
from sigec.frontends import torch_frontend
from sigec.frontends.torch_frontend import export_module, load_factory, normalize_inputs

# Relative L2 error allowed between ONNX Runtime and PyTorch on the same float32 model.
REL_L2_TOLERANCE = 1e-4


def static_dims(value_info) -> list[int]:
    dims = value_info.type.tensor_type.shape.dim
    assert all(d.HasField("dim_value") for d in dims), f"{value_info.name} has a dynamic shape"
    return [d.dim_value for d in dims]


class ConvPlus(nn.Module):
    """Two inputs, two outputs; the second output is the first input unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, image: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(self.conv(image)) + bias, image


class Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError("forward is broken on purpose")


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A throw-away importable module with good and bad factories."""
    (tmp_path / "sigec_test_factories.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        conv = nn.Conv2d(3, 3, 1)

        def module_only():
            return nn.Conv2d(3, 3, 1)

        def with_tensor():
            return nn.Conv2d(3, 3, 1), torch.zeros(1, 3, 4, 4)

        def with_list():
            return nn.Conv2d(3, 3, 1), [torch.zeros(1, 3, 4, 4), torch.zeros(1)]

        def wrong_type():
            return 42

        def wrong_inputs():
            return nn.Conv2d(3, 3, 1), "not a tensor"

        def raises():
            raise RuntimeError("factory failed on purpose")

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "sigec_test_factories"


# ------------------------------------------------------------------------------------------
# load_factory
# ------------------------------------------------------------------------------------------


def test_load_factory_builds_the_demo_model_from_the_cli_factories():
    module, inputs = load_factory("sigec.apps.zoo.cli_factories:tiny_local_small")
    assert isinstance(module, nn.Module)
    assert isinstance(inputs, dict) and list(inputs) == ["image"]
    assert inputs["image"].shape == (1, 3, 32, 32)
    assert not module.training


def test_load_factory_normalises_the_returned_inputs(factory_module):
    module, inputs = load_factory(f"{factory_module}:module_only")
    assert isinstance(module, nn.Conv2d) and inputs is None
    _, inputs = load_factory(f"{factory_module}:with_tensor")
    assert isinstance(inputs, tuple) and len(inputs) == 1 and inputs[0].shape == (1, 3, 4, 4)
    _, inputs = load_factory(f"{factory_module}:with_list")
    assert isinstance(inputs, tuple) and len(inputs) == 2
    module, inputs = load_factory(f"{factory_module}:conv")
    assert isinstance(module, nn.Conv2d) and inputs is None


@pytest.mark.parametrize("spec,message", [
    ("no_colon_here", "expected 'pkg.module:factory'"),
    (":factory", "expected 'pkg.module:factory'"),
    ("sigec.apps.zoo.cli_factories:", "expected 'pkg.module:factory'"),
    ("sigec_no_such_package_xyz:make", "cannot import module 'sigec_no_such_package_xyz'"),
    ("sigec.apps.zoo.cli_factories:no_such_factory", "has no attribute 'no_such_factory'"),
])
def test_load_factory_rejects_bad_specs(spec, message):
    with pytest.raises(CompileError, match=message):
        load_factory(spec)


@pytest.mark.parametrize("name,message", [
    ("wrong_type", "must return an nn.Module or \\(nn.Module, example_inputs\\), got int"),
    ("wrong_inputs", "example inputs must be"),
    ("raises", "raised RuntimeError: factory failed on purpose"),
    ("NOT_CALLABLE", "not a callable factory"),
])
def test_load_factory_reports_bad_factories(factory_module, name, message):
    with pytest.raises(CompileError, match=message):
        load_factory(f"{factory_module}:{name}")


def test_normalize_inputs_forms():
    t = torch.zeros(2)
    assert normalize_inputs(None) is None
    assert normalize_inputs(t)[0] is t
    assert normalize_inputs([t, t]) == (t, t)
    assert list(normalize_inputs({"b": t, "a": t})) == ["b", "a"]
    with pytest.raises(CompileError):
        normalize_inputs({"a": 1.0})
    with pytest.raises(CompileError):
        normalize_inputs(3)


# ------------------------------------------------------------------------------------------
# export_module
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory,size", [("tiny_local_small", 32), ("resnet9_small", 64)])
def test_cli_model_exports_and_matches_onnxruntime(capsys, factory, size):
    """End to end for the zoo's purely local models (the other zoo models: test_zoo.py)."""
    module, inputs = load_factory(f"sigec.apps.zoo.cli_factories:{factory}")
    module.train()
    proto = export_module(module, inputs, opset=18)
    assert not module.training, "export_module puts the module in eval mode"
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "", "export must be quiet"
    assert [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")] == [18]
    assert [i.name for i in proto.graph.input] == ["image"]
    assert static_dims(proto.graph.input[0]) == [1, 3, size, size]
    assert [o.name for o in proto.graph.output] == ["output"]
    assert static_dims(proto.graph.output[0]) == [1, 3, size, size]
    assert len(proto.graph.value_info) > 0, "shapes must be inferred"
    assert all(static_dims(v) for v in proto.graph.value_info)
    (actual,) = ort_oracle(proto)(inputs)
    with torch.no_grad():
        expected = module(**inputs).numpy()
    assert rel_l2(actual, expected) < REL_L2_TOLERANCE


def test_export_names_from_signature_and_default_output_names():
    module = ConvPlus().eval()
    image, bias = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    proto = export_module(module, (image, bias))
    assert [i.name for i in proto.graph.input] == ["image", "bias"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    summed, passthrough = ort_oracle(proto)({"image": image, "bias": bias})
    with torch.no_grad():
        expected = module(image, bias)[0].numpy()
    np.testing.assert_allclose(summed, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(passthrough, image.numpy())


def test_export_dict_inputs_follow_the_forward_order_and_names_can_be_given():
    module = ConvPlus()
    image, bias = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    proto = export_module(module, {"bias": bias, "image": image})
    assert [i.name for i in proto.graph.input] == ["image", "bias"]
    proto = export_module(module, {"bias": bias, "image": image},
                          input_names=["x", "output"], output_names=["y", "x_copy"])
    assert [i.name for i in proto.graph.input] == ["x", "output"]
    assert [o.name for o in proto.graph.output] == ["y", "x_copy"]
    summed, passthrough = ort_oracle(proto)({"x": image, "output": bias})
    np.testing.assert_array_equal(passthrough, image.numpy())
    assert summed.shape == (1, 4, 8, 8)


def test_export_rejects_bad_names_and_inputs():
    module = ConvPlus()
    image, bias = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    with pytest.raises(CompileError, match="1 input names given for 2 example inputs"):
        export_module(module, (image, bias), input_names=["only_one"])
    with pytest.raises(CompileError, match="do not fit forward"):
        export_module(module, {"image": image, "nonsense": bias})
    with pytest.raises(CompileError, match="needs example inputs"):
        export_module(module, None)
    with pytest.raises(CompileError, match="needs an nn.Module"):
        export_module(lambda x: x, image)


def test_export_falls_back_to_torchscript_with_a_warning(monkeypatch):
    real_export = torch.onnx.export

    def dynamo_fails(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch_frontend.torch.onnx, "export", dynamo_fails)
    module = ConvPlus()
    image, bias = torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8)
    with pytest.warns(RuntimeWarning, match="simulated dynamo failure.*TorchScript"):
        proto = export_module(module, {"image": image, "bias": bias})
    assert [i.name for i in proto.graph.input] == ["image", "bias"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1"]
    summed, _ = ort_oracle(proto)({"image": image, "bias": bias})
    with torch.no_grad():
        np.testing.assert_allclose(summed, module(image, bias)[0].numpy(), rtol=1e-5, atol=1e-5)


def test_export_failure_is_a_compile_error_with_the_exporter_message():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(CompileError, match="forward is broken on purpose"):
            export_module(Broken(), torch.randn(1, 3, 4, 4))
