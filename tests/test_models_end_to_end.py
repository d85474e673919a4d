"""Every zoo model end to end: compile (sigec.compile), prime, run an edit sparsely, compare with dense.

Small zoo models, ONNX Runtime backend with the native custom operators. Each model is exported
and compiled once per module (exports take seconds). Engines are loaded with
``dense_fallback_fraction=10`` so every run takes the sparse path even where the mask covers most
tiles (resnet9's 16x16 bottleneck): these tests check the sparse graphs, not the fallback policy.

Also: the ONNX-file path equals the PyTorch path (small UNet), and the SDEdit loop (tools/sdedit.py,
sigec/apps/sdedit.py) on the small UNet.
"""

from __future__ import annotations

import importlib.util
import pathlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import rel_err, rel_l2

import sigec
from sigec.apps import sdedit
from sigec.runtime.synthetic_edits import square_mask
from sigec.apps.zoo import build, edit_label_map

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXACT_TOLERANCE = 1e-4  # max |sparse - dense| / max |dense| for exact mode
EDIT_FRACTION = 0.012  # a centred square of 1.2% of the pixels


@dataclass(frozen=True)
class Case:
    """One zoo model configuration, its compile mode and (approx mode) its relative L2 bound."""

    model: str
    mode: str
    build_kwargs: dict[str, Any] = field(default_factory=dict)
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    rel_l2_bound: float | None = None  # approx mode only; exact mode uses EXACT_TOLERANCE


CASES = {
    "tiny_local": Case("tiny_local", "exact"),
    # SPADE resizes the label map down with nearest Resize (integer downscales): sparse, exact.
    "spade": Case("spade", "exact"),
    "resnet9_batch": Case("resnet9", "exact", build_kwargs={"norm": "batch"}),
    # Approx-mode bounds: ~1.5x the relative L2 error measured (random weights, seeds below).
    # resnet9 (instance) 0.189, dense change 0.226 (so `error < change` is the tighter check):
    # InstanceNorm statistics are frozen and, above all, 18 3x3 convs at the 16x16 bottleneck
    # spread the edit far beyond the approx masks (96% of the dense change lies outside the
    # edited square), which SIGE-style approx ignores by design.
    "resnet9_instance": Case("resnet9", "approx", build_kwargs={"norm": "instance"}, rel_l2_bound=0.29),
    # ddpm_unet 0.0377 with the default 4-px tiles (0.0213 with 8-px tiles), dense change 0.075
    # (attention islands, frozen GroupNorm statistics; smaller tiles cover less around the edit).
    "ddpm_unet": Case("ddpm_unet", "approx", rel_l2_bound=0.057),
    # sd_vae_decoder 0.0899, dense change 0.172 (mid-block attention on the 8x8 latent, frozen GroupNorm).
    "sd_vae_decoder": Case("sd_vae_decoder", "approx", rel_l2_bound=0.135),
}


@dataclass
class Compiled:
    """A compiled and loaded zoo model with its example inputs."""

    case: Case
    path: pathlib.Path
    engine: sigec.Engine
    module: torch.nn.Module
    example: dict[str, torch.Tensor]

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.example.items()}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Callable[[str], Compiled]:
    """``compiled(name)``: the case's model compiled once per module (via the PyTorch path) and loaded."""
    folder = tmp_path_factory.mktemp("engines")
    cache: dict[str, Compiled] = {}

    def get(name: str) -> Compiled:
        if name not in cache:
            case = CASES[name]
            module, example = build(case.model, small=True, **case.build_kwargs)
            path = sigec.compile(module, folder / f"{name}.sigec", inputs=example, mode=case.mode, backend="ort",
                                 **case.compile_kwargs)
            engine = sigec.load(path, threads=1, dense_fallback_fraction=10.0)
            cache[name] = Compiled(case, path, engine, module, example)
        return cache[name]

    return get


def _spatial_name(engine: sigec.Engine) -> str:
    (name,) = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
    return name


def _edit(compiled_model: Compiled, seed: int = 1) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Edited inputs and the pixel mask: SPADE gets a relabelled box, the others noise in a square."""
    inputs = compiled_model.inputs
    name = _spatial_name(compiled_model.engine)
    x0 = inputs[name]
    mask = square_mask(x0.shape[-2], x0.shape[-1], EDIT_FRACTION)
    edited = dict(inputs)
    if compiled_model.case.model == "spade":
        rows, cols = np.nonzero(mask)
        box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        present = x0[0, :, mask].sum(axis=1)  # pixels of each class inside the box
        new_class = int(np.argmin(present))  # a class (nearly) absent from the box: a real change
        edited[name] = edit_label_map(torch.from_numpy(x0), box, new_class).numpy()
    else:
        noise = np.random.default_rng(seed).standard_normal(x0.shape).astype(np.float32) * 0.5
        edited[name] = x0 + noise * mask
    changed = np.abs(edited[name] - x0).max(axis=(0, 1)) > 0
    assert changed.any() and not (changed & ~mask).any(), "the edit must change pixels, inside the mask only"
    return edited, mask


@pytest.mark.parametrize("name", list(CASES))
def test_sparse_edit_matches_dense(compiled, name):
    model = compiled(name)
    engine = model.engine
    assert engine.manifest["mode"] == model.case.mode
    primed = engine.prime(model.inputs)[0]
    np.testing.assert_allclose(primed, engine.run_dense(model.inputs)[0], rtol=0, atol=1e-5 * np.abs(primed).max())
    edited, mask = _edit(model)
    sparse = engine.run(edited, mask=mask)[0]
    stats = engine.stats
    assert stats.path == "sparse", f"{name}: expected the sparse path, got {stats.path}"
    dense = engine.run_dense(edited)[0]
    assert sparse.shape == dense.shape == primed.shape
    change = rel_l2(dense, primed)
    assert change > 1e-3, f"{name}: the edit must change the dense output (rel. L2 change {change:.2e})"
    if model.case.mode == "exact":
        # Measured: 0 for tiny_local, spade and resnet9 (batch) (1.8e-7 for spade with another new class).
        assert rel_err(sparse, dense) <= EXACT_TOLERANCE, (name, rel_err(sparse, dense))
    else:
        error = rel_l2(sparse, dense)
        assert error <= model.case.rel_l2_bound, (name, error)
        assert error < change, f"{name}: sparse ({error:.3f}) must be closer to dense than the unedited output"


def test_unchanged_inputs_return_the_primed_output(compiled):
    model = compiled("tiny_local")
    primed = model.engine.prime(model.inputs)[0]
    np.testing.assert_array_equal(model.engine.run(model.inputs)[0], primed)
    assert model.engine.stats.path == "empty"


class _NearestDownscale(torch.nn.Module):
    """The op SPADE needs: the input resized DOWN by an integer factor with nearest, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.nn.functional.interpolate(x, size=(8, 8), mode="nearest"))


def test_nearest_downscale_compiles_sparse_in_exact_mode(tmp_path):
    """A nearest downscale (SPADE's label-map resizing) has a sparse rule."""
    example = {"x": torch.randn(1, 3, 32, 32)}
    engine = sigec.load(sigec.compile(_NearestDownscale().eval(), tmp_path / "down.sigec", inputs=example, mode="exact"))
    resize = next(n for n in engine.manifest["nodes"] if n["op_type"] == "Resize")
    assert resize["kind"] == "sparse"


def test_onnx_file_path_matches_pytorch_path(compiled, tmp_path):
    from sigec.frontends.torch_frontend import export_module

    model = compiled("ddpm_unet")
    onnx_path = tmp_path / "ddpm_unet_small.onnx"
    onnx.save(export_module(model.module, model.example), onnx_path)
    from_file = sigec.load(sigec.compile(onnx_path, tmp_path / "from_file.sigec", mode="approx"), threads=1,
                           dense_fallback_fraction=10.0)
    from_module = model.engine
    assert [n["op_type"] for n in from_file.manifest["nodes"]] == [n["op_type"] for n in from_module.manifest["nodes"]]
    edited, mask = _edit(model, seed=2)
    outputs = {}
    for label, engine in (("file", from_file), ("module", from_module)):
        primed = engine.prime(model.inputs, key="onnx-vs-torch")[0]
        sparse = engine.run(edited, mask=mask, key="onnx-vs-torch")[0]
        outputs[label] = (primed, sparse, engine.run_dense(edited)[0])
    # Measured: bit-identical (max difference 0.0: both paths run the same exporter on the same module).
    for got, want in zip(outputs["file"], outputs["module"]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


# ----- SDEdit -------------------------------------------------------------------------------------


def test_ddim_recovers_the_clean_image_from_the_true_noise():
    schedule = sdedit.ddim_schedule(steps=5, strength=0.6)
    assert list(schedule.timesteps) == [599, 479, 359, 240, 120]
    bars = sdedit.linear_alpha_bars()
    assert bars[0] == pytest.approx(1 - 1e-4) and bars[-1] == pytest.approx(4.04e-5, rel=0.01)
    rng = np.random.default_rng(0)
    clean = rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(clean.shape).astype(np.float32)
    x = sdedit.add_noise(clean, noise, float(schedule.alpha_bars[0]))
    for step in range(len(schedule)):  # with the true noise every DDIM step stays on q(x_t | clean)
        x = sdedit.ddim_step(x, noise, float(schedule.alpha_bars[step]), float(schedule.alpha_bars_next[step]))
        want = sdedit.add_noise(clean, noise, float(schedule.alpha_bars_next[step]))
        np.testing.assert_allclose(x, want, atol=1e-4)
    np.testing.assert_allclose(x, clean, atol=1e-4)


def test_sdedit_helpers():
    mask = sdedit.centered_square(32, 0.012)
    assert mask.sum() == 16 and mask[14:18, 14:18].all()
    grown = sdedit.dilate(mask, 1)
    assert grown.sum() == 36 and grown[13:19, 13:19].all()
    image = sdedit.synthetic_image(32)
    assert image.shape == (1, 3, 32, 32) and image.min() >= -1 and image.max() <= 1
    assert sdedit.psnr(image, image) == float("inf")
    assert sdedit.psnr(image + 0.02, image) == pytest.approx(20 * np.log10(2 / 0.02), rel=1e-4)


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sdedit_tool_on_the_small_unet(compiled, tmp_path, capsys):
    model = compiled("ddpm_unet")
    tool = _load_tool("sdedit")
    numbers = tool.main(["--small", "--steps", "3", "--threads", "1", "--engine", str(model.path),
                         "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "reusing engine" in printed and "PSNR sparse vs dense" in printed
    png = tmp_path / "sdedit.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Measured: 52.0 dB sparse vs dense (the unedited result: 34.0 dB from the dense edit). 48 dB
    # allows a 1.6x larger RMS error.
    assert numbers["psnr_sparse_vs_dense_db"] > 48.0, numbers
    assert numbers["psnr_sparse_vs_dense_db"] > numbers["psnr_unedited_vs_dense_db"] + 6.0, numbers
    assert numbers["cache_bytes"] > 0


def test_run_sdedit_primes_one_cache_per_step(compiled):
    engine = compiled("ddpm_unet").engine
    original = sdedit.synthetic_image(32, seed=3)
    mask = sdedit.centered_square(32, 0.05)
    edited = sdedit.paint(original, mask)
    result = sdedit.run_sdedit(engine, original, edited, sdedit.dilate(mask, 1), steps=2, strength=0.5, seed=1)
    assert result.timesteps == [499, 250]
    assert set(engine.cache_keys()) >= {0, 1}
    assert result.cache_bytes == engine.cache_bytes(0) + engine.cache_bytes(1)
    assert result.paths == ["sparse", "sparse"]
    assert np.isfinite(result.sparse).all() and np.abs(result.sparse).max() <= 1.0 + 1e-5
    assert result.psnr_sparse_vs_dense > result.psnr_original_vs_dense
