"""The zoo's latent-diffusion models (issue 12, part 5): the SD 1.5 UNet (``sd_unet``), DiT-XL/2
(``dit``) and the SD VAE encoder (``sd_vae_encoder``), small variants only.

Each small model is built and exported once per module; it must match PyTorch under ONNX Runtime,
its export must have the op counts its module structure implies, and the engine ``sigec.compile``
makes of the export (``fallback="dense"``: whatever the token rules do not cover yet stays dense)
must match ONNX Runtime on the export after ``prime`` + ``run`` of a small edit:

- exact mode: to ``EXACT_TOLERANCE`` (1e-5, max-abs relative), on the sparse path;
- approx mode: the sparse run's relative L2 error inside the edit and over the whole output at
  most the fractions ``APPROX_BOUNDS`` of not recomputing's.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import sigec
from helpers import always_sparse, assert_approx, assert_exact, compare_with_oracle, ort_oracle, rel_l2
from sigec import inspection
from sigec.apps import zoo
from sigec.frontends.onnx_frontend import load_onnx
from sigec.frontends.torch_frontend import export_module
from sigec.runtime.synthetic_edits import square_mask

NAMES = ["sd_unet", "dit", "sd_vae_encoder"]

EDIT_FRACTION = 0.012
"""The edit: a centred square of 1.2% of the pixels (as in test_models_end_to_end.py)."""

REL_L2_TOLERANCE = 1e-4
"""ONNX Runtime on the export against PyTorch: relative L2 error (float32, as in test_zoo.py)."""

# Approx mode: (inside, whole) bounds on sparse error / error of not recomputing for the edit below.
# Measured (random weights, seed 0; edit seed 1): inside / whole output.
APPROX_BOUNDS = {
    "sd_unet": (0.2, 0.75),  # 0.099 / 0.54: attention and frozen GroupNorm statistics at 8x8
    "dit": (0.1, 0.5),  # 0.001 / 0.019 (tile size 2): self-attention over cached keys / values
    "sd_vae_encoder": (0.4, 0.6),  # 0.235 / 0.38: frozen GroupNorm statistics, mid-block attention at 8x8
}

MAC_TOLERANCE = 0.01
"""The manifest's MAC total against PyTorch's FlopCounterMode (DiT computes block 0's timestep
embedding twice in PyTorch, once in the export: 0.4% of the small model)."""

# name -> (input shapes and dtypes, output shape, spatial input) of the small variant's defaults
SMALL_SIGNATURES = {
    "sd_unet": ({"sample": ((2, 4, 16, 16), torch.float32), "timestep": ((2,), torch.float32),
                 "encoder_hidden_states": ((2, 7, 32), torch.float32)}, (2, 4, 16, 16), "sample"),
    "dit": ({"sample": ((1, 4, 16, 16), torch.float32), "timestep": ((1,), torch.int64),
             "class_labels": ((1,), torch.int64)}, (1, 8, 16, 16), "sample"),
    "sd_vae_encoder": ({"image": ((1, 3, 64, 64), torch.float32)}, (1, 4, 8, 8), "image"),
}


@dataclass(frozen=True)
class Built:
    module: torch.nn.Module
    example: dict[str, torch.Tensor]
    expected: torch.Tensor  # PyTorch output on the example
    proto: onnx.ModelProto  # the export

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.example.items()}


class _BuiltOnce(dict):
    """name -> Built, each small model built, run and exported on first use."""

    def __missing__(self, name: str) -> Built:
        module, example = zoo.build(name, small=True)
        with torch.no_grad():
            expected = module(**example)
        self[name] = Built(module, example, expected, export_module(module, example))
        return self[name]


@pytest.fixture(scope="module")
def built() -> dict[str, Built]:
    """Every small model built, run and exported once per module (on first use)."""
    return _BuiltOnce()


TILE_SIZES = {"dit": 2}
"""Compile-time tile sizes (default otherwise): DiT's 16x16 latent is an 8x8 token grid, which the
default tiles cut into 4 tiles that the edit's approx mask covers entirely; 2x2 tiles leave 3/4 idle."""


@pytest.fixture(scope="module")
def engine_path(built, tmp_path_factory):
    """``engine_path(name, mode)``: the export compiled once into an engine file (ORT backend)."""
    folder = tmp_path_factory.mktemp("zoo_transformers")
    cache: dict[tuple[str, str], Path] = {}

    def get(name: str, mode: str) -> Path:
        if (name, mode) not in cache:
            cache[name, mode] = sigec.compile(built[name].proto, folder / f"{name}_{mode}.sigec", mode=mode,
                                              fallback="dense", tile_size=TILE_SIZES.get(name))
        return cache[name, mode]

    return get


def small_edit(inputs: dict[str, np.ndarray], spatial: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """As test_models_end_to_end.py edits: noise (std 0.5) added to the spatial input inside a
    centred square of EDIT_FRACTION of its pixels (2x2 of the 16x16 latents, 7x7 of the 64 px image)."""
    x0 = inputs[spatial]
    mask = square_mask(x0.shape[-2], x0.shape[-1], EDIT_FRACTION)
    noise = np.random.default_rng(1).standard_normal(x0.shape).astype(np.float32) * 0.5
    edited = dict(inputs)
    edited[spatial] = x0 + noise * mask
    return edited, mask


def test_registered_in_the_zoo():
    for name in NAMES:
        assert name in zoo.MODELS and name in zoo.__all__
        assert zoo.MODELS[name] is getattr(zoo, name)


@pytest.mark.parametrize("name", NAMES)
def test_small_model_inputs_and_output(built, name):
    b = built[name]
    shapes, out_shape, _ = SMALL_SIGNATURES[name]
    assert not b.module.training
    assert {k: (tuple(v.shape), v.dtype) for k, v in b.example.items()} == shapes
    assert list(b.example) == list(shapes), "inputs in forward order"
    assert isinstance(b.expected, torch.Tensor) and tuple(b.expected.shape) == out_shape
    assert torch.isfinite(b.expected).all()
    assert 0.05 < float(b.expected.std()) < 5.0, f"{name}: output std {float(b.expected.std())}"


def test_sd_unet_batch_and_size_arguments():
    _, inputs = zoo.build("sd_unet", small=True, batch=1)  # the default, 2, is in SMALL_SIGNATURES
    assert inputs["sample"].shape[0] == inputs["encoder_hidden_states"].shape[0] == inputs["timestep"].shape[0] == 1
    with pytest.raises(ValueError, match="contradicts"):
        zoo.build("sd_unet", small=True, size="full")
    with pytest.raises(ValueError, match="size must be one of"):
        zoo.build("sd_unet", size="huge")


def test_dit_labels_are_classes_and_the_timestep_an_integer(built):
    example = built["dit"].example
    assert 0 <= int(example["class_labels"].min()) and int(example["class_labels"].max()) < 10
    assert example["timestep"].tolist() == [500]


def test_sd_vae_encoder_returns_the_latent_mean_of_the_seeds_autoencoder(built):
    from diffusers import AutoencoderKL

    from sigec.apps.zoo.sd_vae import SMALL_CONFIG
    from sigec.apps.zoo.weights import seeded

    with seeded(0):
        vae = AutoencoderKL(**SMALL_CONFIG).eval()
    b = built["sd_vae_encoder"]
    with torch.no_grad():
        mean = vae.encode(b.example["image"]).latent_dist.mean
        decoder, _ = zoo.build("sd_vae_decoder", small=True)
    torch.testing.assert_close(b.expected, mean, rtol=1e-5, atol=1e-6)
    # the two halves of one seed are one autoencoder
    assert torch.equal(decoder.post_quant_conv.weight, vae.post_quant_conv.weight)


@pytest.mark.parametrize("name", NAMES)
def test_export_matches_pytorch_under_onnxruntime(built, name):
    b = built[name]
    assert [i.name for i in b.proto.graph.input] == list(b.example)
    for graph_input in b.proto.graph.input:
        dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
        assert dims == list(b.example[graph_input.name].shape), "inputs must have static shapes"
    (actual,) = ort_oracle(b.proto)(b.inputs)
    assert actual.shape == tuple(b.expected.shape)
    assert rel_l2(actual, b.expected.numpy()) < REL_L2_TOLERANCE


@pytest.mark.parametrize("name", NAMES)
def test_export_op_counts_follow_the_module_structure(built, name):
    b = built[name]
    ops = collections.Counter(n.op_type for n in b.proto.graph.node)
    modules = collections.Counter(type(m).__name__ for m in b.module.modules())
    assert modules["Attention"] > 0 and ops["Conv"] > 0
    assert ops["Conv"] == modules["Conv2d"]
    assert ops["Softmax"] == modules["Attention"], "one softmax per attention layer"
    # every Linear is a MatMul or Gemm, every attention adds two MatMuls (Q K^T and attention x V)
    assert ops["MatMul"] + ops["Gemm"] == modules["Linear"] + 2 * modules["Attention"]
    assert ops["InstanceNormalization"] == modules["GroupNorm"], "GroupNorm exports as InstanceNormalization"
    assert ops["LayerNormalization"] == modules["LayerNorm"]


@pytest.mark.parametrize("name", NAMES)
def test_engine_manifest_lists_the_models_nodes(built, engine_path, name):
    b = built[name]
    manifest = sigec.load(engine_path(name, "exact"), threads=1).manifest
    nodes = manifest["nodes"]
    canonical = load_onnx(b.proto)
    assert len(nodes) == len(list(canonical.graph)), "one report per node of the canonical model"
    exported = collections.Counter(n.op_type for n in b.proto.graph.node)
    listed = collections.Counter(n["op_type"] for n in nodes)
    for op in ("Conv", "MatMul", "Gemm", "Softmax", "LayerNormalization"):
        assert listed[op] == exported[op], op
    kinds = collections.Counter(n["kind"] for n in nodes)
    assert kinds["sparse"] >= 1, "the first convolution runs on tiles"
    # timestep, text and class inputs drive nodes computed once per cache key
    assert (kinds["static"] > 0) == (name != "sd_vae_encoder")
    _, _, spatial = SMALL_SIGNATURES[name]
    assert [i["name"] for i in manifest["inputs"] if i["spatial"]] == [spatial]
    # MACs: the node reports against PyTorch's own count (shapes only, on the meta device)
    with torch.device("meta"):
        meta_module, meta_inputs = zoo.build(name, small=True)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_module(**meta_inputs)
    total = sum(int(n.get("dense_macs", 0)) for n in nodes)
    assert abs(total - counter.get_total_flops() // 2) <= MAC_TOLERANCE * total, (total, counter.get_total_flops())
    report = inspection.report(manifest)
    static = sum(int(n.get("dense_macs", 0)) for n in nodes if n["kind"] == "static")
    assert report["dense_macs"] == total - static, "a dense run leaves out what is computed once per key"
    ops = {row["name"]: row for row in inspection.summary(report)["ops"]}
    assert ops["Conv"]["nodes"] == exported["Conv"] and ops["Softmax"]["nodes"] == exported["Softmax"]


@pytest.mark.parametrize("name", NAMES)
def test_exact_engine_matches_onnxruntime_after_a_small_edit(built, engine_path, name):
    b = built[name]
    engine = always_sparse(sigec.load(engine_path(name, "exact"), threads=1))
    edited, mask = small_edit(b.inputs, SMALL_SIGNATURES[name][2])
    comparison = compare_with_oracle(engine, ort_oracle(b.proto), b.inputs, edited, mask)
    assert_exact(comparison, context=name)


@pytest.mark.parametrize("name", NAMES)
def test_approx_engine_recomputes_the_edit(built, engine_path, name):
    b = built[name]
    engine = always_sparse(sigec.load(engine_path(name, "approx"), threads=1))
    edited, mask = small_edit(b.inputs, SMALL_SIGNATURES[name][2])
    comparison = compare_with_oracle(engine, ort_oracle(b.proto), b.inputs, edited, mask)
    inside, whole = APPROX_BOUNDS[name]
    assert_approx(comparison, inside=inside, whole=whole, context=name)
    cost = inspection.report(engine.manifest, mask)
    assert cost["mask"]["executed_macs"] < cost["dense_macs"], "the edit must leave work undone"
