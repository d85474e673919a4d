"""Latent SDEdit (issue 12, part 5): Stable Diffusion img2img with sigec engines, small models.

``sigec.apps.sdedit.latent_sdedit`` encodes the edited image with the VAE encoder engine, noises
it, runs the SD UNet with classifier-free guidance (batch 2) one cache key per step, and decodes
with the VAE decoder engine; each engine primed on the original image's run. Small zoo variants
(random weights): the small UNet (16x16 latent) and the small VAE run at 128 px (16x16 latent).

Checked: the dense pipeline equals the same loop run in PyTorch on the zoo modules (the steps of
diffusers' StableDiffusionImg2ImgPipeline, written out: the pipeline itself needs transformers);
the sparse pipeline's final image against the dense one, inside the edit and overall, as a
fraction of not recomputing's error (tests/helpers.py, ``assert_approx``'s measure); every engine
run took the sparse path; one UNet cache per step key; the UNet ran batch 2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sigec
from helpers import region_of, rel_l2, rel_l2_in
from sigec.apps import sdedit
from sigec.core.errors import InputError

STEPS, STRENGTH, GUIDANCE, SEED = 20, 0.3, 7.5, 0
PX = 128
EDIT = 0.012

# Bounds, as fractions of not recomputing's relative L2 error against the dense final image (the
# original image's result vs the dense edit). The edit: a 1.2% square painted red at 50% opacity,
# mask dilated by 4 px. Measured with this test's embeddings and noise: inside the edit 0.60, whole
# image 0.79; over 8 draws of them: 0.36-0.63 and 0.66-0.80 (float16 caches, approx mode's default,
# and float32 alike). An opaque red square measures about 1.2 inside (worse than not recomputing):
# with random weights the VAE encoder's GroupNorm statistics, frozen from the original in approx
# mode, are far from the edited image's (the encoder engine with every tile active equals a PyTorch
# encoder with those statistics frozen, to 2e-6); BENCHMARKS.md, "Latent SDEdit (Stable Diffusion
# layout)".
INSIDE, WHOLE = 0.75, 0.9


@pytest.fixture(scope="module")
def models():
    return sdedit.latent_sdedit_models("small", seed=SEED)


@pytest.fixture(scope="module")
def engine_paths(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("latent_sdedit")
    return {name: sigec.compile(module, folder / f"{name}.sigec", inputs=example, mode="approx")
            for name, (module, example) in models.items()}


@pytest.fixture(scope="module")
def engines(engine_paths):
    return {name: sigec.load(path, threads=1) for name, path in engine_paths.items()}


@pytest.fixture(scope="module")
def edit():
    original = sdedit.synthetic_image(PX, seed=SEED)
    square = sdedit.centered_square(PX, EDIT)
    edited = (0.5 * original + 0.5 * sdedit.paint(original, square)).astype(np.float32)
    return original, edited, sdedit.dilate(square, 4)


@pytest.fixture(scope="module")
def inputs(models):
    rng = np.random.default_rng(SEED + 1)
    _, unet_example = models["unet"]
    _, length, width = unet_example["encoder_hidden_states"].shape
    return {"text_embeddings": rng.standard_normal((1, length, width)).astype(np.float32),
            "negative_embeddings": rng.standard_normal((1, length, width)).astype(np.float32),
            "noise": rng.standard_normal((1, 4, PX // 8, PX // 8)).astype(np.float32)}


@pytest.fixture(scope="module")
def result(engines, edit, inputs):
    original, edited, mask = edit
    return sdedit.latent_sdedit(engines["encoder"], engines["unet"], engines["decoder"], original, edited, mask,
                                steps=STEPS, strength=STRENGTH, guidance_scale=GUIDANCE, seed=SEED, **inputs)


def test_img2img_timesteps_and_latent_mask():
    scheduler = sdedit.sd_ddim_scheduler()
    # SD's DDIM: "leading" spacing, steps_offset 1; strength 0.3 of 20 steps runs the last 6.
    assert list(sdedit.img2img_timesteps(scheduler, STEPS, STRENGTH)) == [251, 201, 151, 101, 51, 1]
    assert len(sdedit.img2img_timesteps(scheduler, 50, 0.6)) == 30
    with pytest.raises(ValueError):
        sdedit.img2img_timesteps(scheduler, 2, 0.3)  # int(0.6) = 0 steps
    mask = np.zeros((32, 32), bool)
    mask[8, 9] = mask[20:25, 0] = True
    cells = sdedit.latent_mask(mask)
    assert cells.shape == (4, 4) and cells.sum() == 3 and cells[1, 1] and cells[2, 0] and cells[3, 0]


def _pytorch_img2img(models, image: np.ndarray, inputs) -> np.ndarray:
    """The dense pipeline in PyTorch, step for step as StableDiffusionImg2ImgPipeline runs it
    (prepare_latents on an encoded image, the denoising loop with guidance, vae.decode)."""
    encoder, unet, decoder = (models[name][0] for name in ("encoder", "unet", "decoder"))
    scheduler = sdedit.sd_ddim_scheduler()
    timesteps = torch.from_numpy(sdedit.img2img_timesteps(scheduler, STEPS, STRENGTH))
    prompt_embeds = torch.cat([torch.from_numpy(inputs["negative_embeddings"]), torch.from_numpy(inputs["text_embeddings"])])
    with torch.no_grad():
        init_latents = sdedit.VAE_SCALING_FACTOR * encoder(torch.from_numpy(image))  # latent_dist.mode()
        latents = scheduler.add_noise(init_latents, torch.from_numpy(inputs["noise"]), timesteps[:1])
        for t in timesteps:
            latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(latent_model_input, t.float().repeat(2), prompt_embeds)
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        return decoder(latents / sdedit.VAE_SCALING_FACTOR).numpy()


def test_dense_pipeline_equals_pytorch(models, edit, inputs, result):
    _, edited, _ = edit
    # Measured: 2.2e-6 relative L2 (the original's priming run: 2.0e-6).
    with torch.inference_mode():
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            reference = _pytorch_img2img(models, edited, inputs)
        finally:
            torch.set_num_threads(torch_threads)
    assert rel_l2(result.dense, reference) < 1e-4


def test_sparse_final_image_against_dense(edit, result):
    _, _, mask = edit
    region = region_of(mask, result.dense.shape)
    sparse_inside, stale_inside = rel_l2_in(result.sparse, result.dense, region), rel_l2_in(result.original, result.dense, region)
    sparse_whole, stale_whole = rel_l2(result.sparse, result.dense), rel_l2(result.original, result.dense)
    context = (f"inside {sparse_inside:.3e} (not recomputing {stale_inside:.3e}), "
               f"whole {sparse_whole:.3e} (not recomputing {stale_whole:.3e})")
    assert stale_inside > 1e-3, f"the edit must change the result: {context}"
    assert sparse_inside <= INSIDE * stale_inside, context
    assert sparse_whole <= WHOLE * stale_whole, context
    assert result.rel_l2 == pytest.approx(sparse_whole, rel=1e-4)
    assert result.psnr_sparse_vs_dense > result.psnr_original_vs_dense


def test_every_run_sparse_one_cache_per_step_and_cfg_batch_2(engines, result):
    unet = engines["unet"]
    n = len(result.timesteps)
    assert n == int(STEPS * STRENGTH) == 6
    assert result.paths == {"encode": ["sparse"], "unet": ["sparse"] * n, "decode": ["sparse"]}
    assert all(r > 1.0 for stage in result.mac_reductions.values() for r in stage)
    # Classifier-free guidance: the UNet engine takes the latent twice and both embeddings.
    shapes = {i["name"]: i["shape"] for i in unet.manifest["inputs"]}
    assert result.unet_batch == 2
    assert shapes["sample"][0] == shapes["timestep"][0] == shapes["encoder_hidden_states"][0] == 2
    # One cache per step: the keys 0..n-1, each primed with its own timestep.
    assert sorted(unet.cache_keys()) == list(range(n))
    assert result.cache_bytes["unet"] == sum(unet.cache_bytes(k) for k in range(n)) > 0
    step_feeds = {"sample": np.zeros(shapes["sample"], np.float32),
                  "timestep": np.full((2,), result.timesteps[1], np.float32),
                  "encoder_hidden_states": np.zeros(shapes["encoder_hidden_states"], np.float32)}
    with pytest.raises(InputError, match="primed for key 0"):
        unet.run(step_feeds, mask=result.unet_mask, key=0)
    # The UNet mask is the edit on the latent grid; the decoder's covers it (the UNet's recomputed region).
    assert result.unet_mask.shape == (PX // 8, PX // 8) and result.unet_mask.any()
    assert (result.decoder_mask >= result.unet_mask).all()
    assert sorted(engines["encoder"].cache_keys()) == sorted(engines["decoder"].cache_keys()) == [0]


def test_picture(edit, result, tmp_path):
    original, edited, mask = edit
    png = sdedit.save_latent_panels(tmp_path / "latent_sdedit.png", original, edited, mask, result, title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_engines_given_as_paths_are_loaded_per_stage(engine_paths, edit, inputs, result):
    original, edited, mask = edit
    again = sdedit.latent_sdedit(engine_paths["encoder"], engine_paths["unet"], engine_paths["decoder"], original,
                                 edited, mask, steps=STEPS, strength=STRENGTH, guidance_scale=GUIDANCE, seed=SEED,
                                 warmup=False, threads=1, **inputs)
    for name in ("original", "dense", "sparse"):
        np.testing.assert_allclose(getattr(again, name), getattr(result, name), rtol=0, atol=1e-6)
    assert again.paths == result.paths and again.cache_bytes == result.cache_bytes
