"""The model zoo: every small model builds, runs, exports to ONNX and matches ONNX Runtime."""

from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from sigec.apps import zoo
from sigec.frontends.torch_frontend import export_module

# Relative L2 error allowed between ONNX Runtime and PyTorch on the same float32 model.
REL_L2_TOLERANCE = 1e-4

SMALL_MODELS = ["tiny_local", "ddpm_unet", "sd_vae_decoder", "spade", "spade_fused", "resnet9"]
# Latent-diffusion models (other output shapes, non-image inputs): tested in test_zoo_transformers.py.
LATENT_MODELS = ["sd_unet", "dit", "sd_vae_encoder"]
# Detectors (a one-channel probability map): tested in test_mobile_det.py.
DETECTION_MODELS = ["mobile_det"]
# Exports are slow (seconds each), so each model is exported once in the test suite: the
# purely local models tiny_local and resnet9 are exported end to end (CLI factory -> export ->
# ONNX Runtime) in test_torch_frontend.py, the others here.
EXPORTED_HERE = ["ddpm_unet", "sd_vae_decoder", "spade"]


def rel_l2(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@functools.cache
def small_model(name: str) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor]:
    """The small model ``name``, its example inputs and its PyTorch output (built once per session)."""
    module, inputs = zoo.build(name, small=True)
    with torch.no_grad():
        expected = module(**inputs)
    return module, inputs, expected


def test_registry_lists_the_small_models():
    assert sorted(zoo.MODELS) == sorted(SMALL_MODELS + LATENT_MODELS + DETECTION_MODELS)


def test_build_unknown_name_is_a_value_error_naming_the_models():
    with pytest.raises(ValueError, match="unknown zoo model 'nope'.*tiny_local"):
        zoo.build("nope")


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_small_model_runs_in_eval_mode_with_sane_output(name):
    module, inputs, output = small_model(name)
    assert not module.training
    assert isinstance(output, torch.Tensor), f"{name} must return a plain tensor"
    assert output.shape[0] == 1 and output.shape[1] == 3
    spatial = next(iter(inputs.values())).shape[-2:]
    if name == "sd_vae_decoder":
        assert tuple(output.shape[-2:]) == (spatial[0] * 8, spatial[1] * 8)
    else:
        assert output.shape[-2:] == spatial
    assert torch.isfinite(output).all()
    assert 0.05 < float(output.std()) < 5.0, f"{name}: output std {float(output.std())} out of a sane range"


@pytest.mark.parametrize("name", EXPORTED_HERE)
def test_small_model_exports_and_matches_onnxruntime(name):
    module, inputs, expected = small_model(name)
    proto = export_module(module, inputs, opset=18)
    assert [i.name for i in proto.graph.input] == list(inputs)
    assert [o.name for o in proto.graph.output] == ["output"]
    for graph_input in proto.graph.input:
        dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        assert dims == list(inputs[graph_input.name].shape), "inputs must have static shapes"
    out_dims = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
    assert out_dims == list(expected.shape)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {k: v.numpy() for k, v in inputs.items()})
    assert actual.shape == tuple(expected.shape)
    assert rel_l2(actual, expected.numpy()) < REL_L2_TOLERANCE, name


def test_same_seed_same_model_other_seed_other_model():
    first, inputs = zoo.build("tiny_local", small=True, seed=3)
    again, inputs_again = zoo.build("tiny_local", small=True, seed=3)
    other, _ = zoo.build("tiny_local", small=True, seed=4)
    with torch.no_grad():
        assert torch.equal(first(**inputs), again(**inputs_again))
        assert not torch.allclose(first(**inputs), other(**inputs))


def test_build_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("resnet9", small=True)
    assert torch.equal(torch.rand(3), expected)


def test_batch_argument_sets_the_batch_of_inputs_and_outputs():
    module, inputs = zoo.build("tiny_local", small=True, batch=2)
    assert inputs["image"].shape == (2, 3, 32, 32)
    with torch.no_grad():
        assert module(**inputs).shape == (2, 3, 32, 32)
    _, unet_inputs = zoo.build("ddpm_unet", small=True, batch=2)
    assert unet_inputs["sample"].shape == (2, 3, 32, 32) and unet_inputs["timestep"].shape == (2,)


@pytest.mark.parametrize("name,kw", [("tiny_local", {}), ("resnet9", {"norm": "batch"}), ("spade", {})])
def test_batchnorm_is_not_an_identity(name, kw):
    module, _ = zoo.build(name, small=True, **kw)
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    for bn in norms:
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        if bn.affine:
            assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))


def test_resnet9_norm_variants():
    instance, _ = zoo.build("resnet9", small=True)
    batch, inputs = zoo.build("resnet9", small=True, norm="batch")
    assert any(isinstance(m, nn.InstanceNorm2d) for m in instance.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in instance.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    blocks = [m for m in instance.modules() if type(m).__name__ == "ResnetBlock"]
    assert len(blocks) == 9
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in instance.modules()) == 2
    with torch.no_grad():
        assert 0.05 < float(batch(**inputs).std()) < 5.0
    with pytest.raises(ValueError, match="norm"):
        zoo.build("resnet9", small=True, norm="group")


def test_spade_input_channels_and_instance_edges():
    module, inputs = zoo.build("spade", small=True)
    assert inputs["label"].shape == (1, 35, 64, 128)
    assert torch.equal(inputs["label"].sum(dim=1), torch.ones(1, 64, 128)), "label must be one-hot"
    assert module.fc.in_channels == 35
    with_edges, edge_inputs = zoo.build("spade", small=True, instance_edges=True, ngf=1, nhidden=2)
    assert edge_inputs["label"].shape == (1, 36, 64, 128)
    assert with_edges.fc.in_channels == 36
    norm = with_edges.up_3.norm_0.norm
    assert isinstance(norm, nn.BatchNorm2d) and not norm.affine


def test_ddpm_unet_full_size_has_the_published_parameter_count():
    # on the meta device: shapes only, no 455 MB of weights to initialise
    with torch.device("meta"):
        module, inputs = zoo.build("ddpm_unet", small=False)
    params = sum(p.numel() for p in module.parameters())
    assert abs(params - 113.7e6) <= 0.2e6, params
    assert inputs["sample"].shape == (1, 3, 256, 256)


def test_random_label_map_is_one_hot_piecewise_constant_and_seeded():
    labels = zoo.random_label_map(2, 35, 64, 128, seed=7)
    assert labels.shape == (2, 35, 64, 128) and labels.dtype == torch.float32
    assert torch.equal(labels.sum(dim=1), torch.ones(2, 64, 128))
    assert torch.equal(labels, zoo.random_label_map(2, 35, 64, 128, seed=7))
    assert not torch.equal(labels, zoo.random_label_map(2, 35, 64, 128, seed=8))
    ids = labels.argmax(dim=1)
    assert all(len(torch.unique(ids[b])) >= 2 for b in range(2))
    boundary_fraction = float(zoo.label_boundaries(labels).mean())
    assert 0.0 < boundary_fraction < 0.25, "regions must be blobs, not noise"


def test_edit_label_map_changes_exactly_the_box():
    labels = zoo.random_label_map(1, 35, 32, 64, seed=1)
    edited = zoo.edit_label_map(labels, (4, 10, 12, 30), new_class=34)
    assert labels is not edited
    changed = (edited != labels).any(dim=1)[0]
    inside = torch.zeros(32, 64, dtype=torch.bool)
    inside[4:12, 10:30] = True
    assert not changed[~inside].any()
    assert (edited.argmax(dim=1)[0][inside] == 34).all()
    assert torch.equal(edited.sum(dim=1), torch.ones(1, 32, 64))
    with pytest.raises(ValueError):
        zoo.edit_label_map(labels, (0, 0, 4, 4), new_class=35)


def test_label_boundaries_marks_both_sides_of_a_class_change():
    ids = torch.zeros(1, 4, 6, dtype=torch.int64)
    ids[..., 3:] = 1
    labels = torch.nn.functional.one_hot(ids, 2).permute(0, 3, 1, 2).float()
    edges = zoo.label_boundaries(labels)[0, 0]
    assert edges[:, 2].eq(1).all() and edges[:, 3].eq(1).all()
    assert edges[:, [0, 1, 4, 5]].eq(0).all()
