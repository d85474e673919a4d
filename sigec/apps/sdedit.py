"""SDEdit-style image editing with a DDIM sampler, run densely and incrementally on one engine.

The loop (Meng et al., SDEdit; as benchmarked by SIGE): noise the original and the edited image to
the same intermediate timestep with the SAME noise, then denoise both with deterministic DDIM
(eta = 0). The original trajectory primes one cache per step (``key=step``); the edited trajectory
runs sparsely against those caches with the edit mask, and is compared with the dense loop.

Noise schedule: DDPM's linear betas 1e-4 .. 0.02 over 1000 training steps.

Latent SDEdit (:func:`latent_sdedit`): the same edit as Stable Diffusion img2img pipelines run it,
on three engines (VAE encoder, text-conditioned UNet with classifier-free guidance in one batch of
2, VAE decoder) and diffusers' DDIMScheduler with SD 1.5's configuration; one UNet cache per step.
"""

from __future__ import annotations

import gc
import os
import pathlib
import time
from dataclasses import dataclass, field

import numpy as np

from sigec.runtime.engine import Engine

TRAIN_STEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02


# ----- DDIM ---------------------------------------------------------------------------------------


def linear_alpha_bars(train_steps: int = TRAIN_STEPS, beta_start: float = BETA_START,
                      beta_end: float = BETA_END) -> np.ndarray:
    """Cumulative products of ``1 - beta`` for the linear beta schedule, float64 [train_steps]."""
    betas = np.linspace(beta_start, beta_end, train_steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


@dataclass(frozen=True)
class DdimSchedule:
    """The timesteps of an SDEdit run (descending) with ``alpha_bar`` at each and at the next one."""

    timesteps: np.ndarray
    alpha_bars: np.ndarray
    alpha_bars_next: np.ndarray

    def __len__(self) -> int:
        return len(self.timesteps)


def ddim_schedule(steps: int, strength: float, train_steps: int = TRAIN_STEPS) -> DdimSchedule:
    """``steps`` evenly spaced DDIM timesteps from ``strength * train_steps`` down to 0.

    The first timestep is where SDEdit injects noise; after the last one the sampler jumps to the
    clean image (``alpha_bar = 1``).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = round(strength * train_steps) - 1
    timesteps = np.unique(np.round(np.linspace(start, 0, steps, endpoint=False)).astype(np.int64))[::-1]
    if len(timesteps) != steps:
        raise ValueError(f"{steps} steps do not fit below timestep {start} (strength {strength})")
    bars = linear_alpha_bars(train_steps)
    alpha_bars = bars[timesteps]
    alpha_bars_next = np.append(alpha_bars[1:], 1.0)
    return DdimSchedule(timesteps=timesteps, alpha_bars=alpha_bars, alpha_bars_next=alpha_bars_next)


def add_noise(image: np.ndarray, noise: np.ndarray, alpha_bar: float) -> np.ndarray:
    """The forward process ``q(x_t | x_0)``: ``sqrt(a) * x_0 + sqrt(1 - a) * noise`` (float32)."""
    return (np.sqrt(alpha_bar) * image + np.sqrt(1.0 - alpha_bar) * noise).astype(np.float32)


def ddim_step(sample: np.ndarray, eps: np.ndarray, alpha_bar: float, alpha_bar_next: float,
              clip: bool = True) -> np.ndarray:
    """One deterministic DDIM step (eta = 0) from ``alpha_bar`` to ``alpha_bar_next`` (float32).

    With ``clip`` the predicted clean image is clipped to [-1, 1], as DDPM/DDIM samplers do.
    """
    x0 = (sample - np.sqrt(1.0 - alpha_bar) * eps) / np.sqrt(alpha_bar)
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
        eps = (sample - np.sqrt(alpha_bar) * x0) / np.sqrt(1.0 - alpha_bar)
    return (np.sqrt(alpha_bar_next) * x0 + np.sqrt(1.0 - alpha_bar_next) * eps).astype(np.float32)


# ----- images and masks ---------------------------------------------------------------------------


def synthetic_image(size: int, batch: int = 1, seed: int = 0) -> np.ndarray:
    """A smooth synthetic RGB image in [-1, 1], [batch, 3, size, size]: a sky-like vertical gradient,
    a few soft blobs and low-frequency waves. Deterministic for a seed; nothing is downloaded."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / max(size - 1, 1)
    images = []
    for _ in range(batch):
        top, bottom = rng.uniform(-0.8, 0.8, 3), rng.uniform(-0.8, 0.8, 3)
        image = top[:, None, None] * (1 - yy) + bottom[:, None, None] * yy
        for _ in range(3):
            cy, cx = rng.uniform(0.2, 0.8, 2)
            radius = rng.uniform(0.1, 0.25)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
            image = image + rng.uniform(-0.6, 0.6, 3)[:, None, None] * blob
        fy, fx, phase = rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 2 * np.pi)
        image = image + 0.15 * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
        images.append(np.clip(image, -1, 1))
    return np.stack(images).astype(np.float32)


def centered_square(size: int, fraction: float) -> np.ndarray:
    """Boolean [size, size] mask of a centred square covering about ``fraction`` of the pixels (>= 1 px)."""
    side = min(size, max(1, round(float(np.sqrt(fraction * size * size)))))
    mask = np.zeros((size, size), bool)
    start = (size - side) // 2
    mask[start:start + side, start:start + side] = True
    return mask


def paint(image: np.ndarray, mask: np.ndarray, color: tuple[float, float, float] = (0.9, -0.9, -0.9)) -> np.ndarray:
    """A copy of ``image`` [B, 3, H, W] with ``mask`` [H, W] painted in ``color`` (default red)."""
    edited = image.copy()
    for channel, value in enumerate(color):
        edited[:, channel][:, mask] = value
    return edited


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation of a boolean [H, W] mask by ``radius`` pixels."""
    if radius <= 0:
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, radius)
    out = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= padded[dy:dy + h, dx:dx + w]
    return out


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (``inf`` for identical images); images in [-1, 1] by default."""
    mse = float(np.mean((image.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))


# ----- the edit loop ------------------------------------------------------------------------------


class _FinalImages:
    """PSNRs of an edit's final images (``original``, ``dense``, ``sparse`` fields of the subclass)."""

    original: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray

    @property
    def psnr_sparse_vs_dense(self) -> float:
        """PSNR (dB, data range 2) of the sparse final image against the dense one."""
        return psnr(self.sparse, self.dense)

    @property
    def psnr_original_vs_dense(self) -> float:
        """PSNR of the unedited result against the dense edit: what ignoring the edit would give."""
        return psnr(self.original, self.dense)


@dataclass
class SdeditResult(_FinalImages):
    """Final images and measurements of one SDEdit run (images [B, 3, H, W] in [-1, 1])."""

    original: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    timesteps: list[int]
    prime_s: float
    dense_s: float
    sparse_s: float
    cache_bytes: int
    paths: list[str] = field(default_factory=list)
    mac_reductions: list[float] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        """Dense loop time over sparse loop time (priming excluded)."""
        return self.dense_s / self.sparse_s


def _feeds(sample: np.ndarray, timestep: int, batch: int, sample_name: str, timestep_name: str,
           timestep_dtype: np.dtype) -> dict[str, np.ndarray]:
    return {sample_name: sample, timestep_name: np.full((batch,), timestep, dtype=timestep_dtype)}


def run_sdedit(engine: Engine, original: np.ndarray, edited: np.ndarray, mask: np.ndarray, *, steps: int = 50,
               strength: float = 0.6, seed: int = 0, sample_name: str = "sample",
               timestep_name: str = "timestep") -> SdeditResult:
    """Edit ``original`` into ``edited`` with SDEdit/DDIM: prime one cache per step on the original
    trajectory, then run the edited trajectory sparsely (``mask``, [H, W] or [B, H, W] boolean) and
    densely; return both final images, the original's, the loop times and the cache size.

    ``engine`` is a compiled noise-prediction UNet with inputs ``sample`` [B, 3, H, W] and
    ``timestep`` [B]. Every key the engine already holds for steps ``0..steps-1`` is replaced.
    """
    specs = {i["name"]: i for i in engine.manifest["inputs"]}
    batch = int(specs[sample_name]["shape"][0])
    t_dtype = np.dtype(specs[timestep_name]["dtype"])
    schedule = ddim_schedule(steps, strength)
    noise = np.random.default_rng(seed).standard_normal(original.shape).astype(np.float32)
    start_bar = float(schedule.alpha_bars[0])

    def feeds(sample: np.ndarray, step: int) -> dict[str, np.ndarray]:
        return _feeds(sample, int(schedule.timesteps[step]), batch, sample_name, timestep_name, t_dtype)

    def advance(sample: np.ndarray, eps: np.ndarray, step: int) -> np.ndarray:
        return ddim_step(sample, eps, float(schedule.alpha_bars[step]), float(schedule.alpha_bars_next[step]))

    begin = time.perf_counter()
    x = add_noise(original, noise, start_bar)
    for step in range(steps):
        x = advance(x, engine.prime(feeds(x, step), key=step)[0], step)
    original_final = x
    prime_s = time.perf_counter() - begin

    x_edit = add_noise(edited, noise, start_bar)
    engine.run_dense(feeds(x_edit, 0))  # warm-up of both sessions, outside the timed loops
    engine.run(feeds(x_edit, 0), mask=mask, key=0)

    paths, reductions = [], []
    begin = time.perf_counter()
    x = x_edit
    for step in range(steps):
        eps = engine.run(feeds(x, step), mask=mask, key=step)[0]
        stats = engine.stats
        if stats is not None:
            paths.append(stats.path)
            reductions.append(stats.mac_reduction)
        x = advance(x, eps, step)
    sparse_final, sparse_s = x, time.perf_counter() - begin

    begin = time.perf_counter()
    x = x_edit
    for step in range(steps):
        x = advance(x, engine.run_dense(feeds(x, step))[0], step)
    dense_final, dense_s = x, time.perf_counter() - begin

    return SdeditResult(original=original_final, dense=dense_final, sparse=sparse_final,
                        timesteps=[int(t) for t in schedule.timesteps], prime_s=prime_s, dense_s=dense_s,
                        sparse_s=sparse_s, cache_bytes=sum(engine.cache_bytes(step) for step in range(steps)),
                        paths=paths, mac_reductions=reductions)


# ----- picture ------------------------------------------------------------------------------------


def _rgb(image: np.ndarray) -> np.ndarray:
    return np.clip((image[0].transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unreadable): the tools size their caches by it."""
    try:
        lines = pathlib.Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def _save_row(path: str | pathlib.Path, panels: list[tuple[str, np.ndarray]], title: str) -> pathlib.Path:
    """One row of titled pictures as a PNG (2-D panels, masks and error maps, in grey scaled to their maximum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for ax, (name, picture) in zip(axes, panels):
        if picture.ndim == 2:
            ax.imshow(picture, cmap="gray", interpolation="nearest", vmin=0, vmax=max(float(picture.max()), 1e-12))
        else:
            ax.imshow(picture, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def save_panels(path: str | pathlib.Path, original: np.ndarray, edited: np.ndarray, result: SdeditResult,
                mask: np.ndarray, title: str = "") -> pathlib.Path:
    """Save original, edited, dense result, sparse result, mask and |sparse - dense| side by side as a PNG."""
    difference = np.abs(result.sparse - result.dense)[0].max(axis=0)
    panels = [("original", _rgb(original)), ("edited input", _rgb(edited)), ("dense SDEdit", _rgb(result.dense)),
              ("sigec sparse SDEdit", _rgb(result.sparse)), ("mask", mask if mask.ndim == 2 else mask[0]),
              (f"|sparse - dense| (max {difference.max():.2g})", difference)]
    return _save_row(path, panels, title)


# ----- latent SDEdit (Stable Diffusion img2img) ---------------------------------------------------
#
# The same loop in latent space, as diffusers' StableDiffusionImg2ImgPipeline runs it: encode the
# image with the VAE encoder (latent mean x 0.18215), noise it at the first img2img timestep, run
# the text-conditioned UNet with classifier-free guidance (one batch of 2: the latent twice, the
# unconditional then the conditional text embeddings; eps = uncond + scale * (cond - uncond)),
# step a DDIM scheduler, decode latent / 0.18215 with the VAE decoder. Three engines, each primed
# on the original image's run (the UNet once per step, ``key=step``) and run sparsely on the edit.

SD_SCHEDULER_CONFIG: dict[str, object] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}
"""Stable Diffusion 1.5's scheduler configuration (runwayml/stable-diffusion-v1-5, scheduler/
scheduler_config.json: the scaled-linear betas, no clipping, steps_offset 1; prediction_type and
timestep_spacing, absent there, at DDIMScheduler's defaults): what a pipeline gets from
``DDIMScheduler.from_config(pipe.scheduler.config)``."""

VAE_SCALING_FACTOR = 0.18215
"""SD v1's ``vae.config.scaling_factor``: latents = encoder mean x this; the decoder gets latents / this."""

VAE_FACTOR = 8
"""Pixels per latent cell of the SD VAE (3 downsamplings)."""


def sd_ddim_scheduler(config: dict[str, object] | None = None):  # -> diffusers.DDIMScheduler
    """diffusers' ``DDIMScheduler`` configured from ``config`` (default :data:`SD_SCHEDULER_CONFIG`); nothing is downloaded."""
    from diffusers import DDIMScheduler  # optional dependency, imported on use

    return DDIMScheduler.from_config(dict(SD_SCHEDULER_CONFIG if config is None else config))


def img2img_timesteps(scheduler, steps: int, strength: float) -> np.ndarray:
    """The timesteps an img2img pipeline runs for ``steps`` inference steps at ``strength`` (int64,
    descending): the last ``int(steps * strength)`` of ``scheduler.set_timesteps(steps)``, as
    ``StableDiffusionImg2ImgPipeline.get_timesteps`` picks them. Sets the scheduler's timesteps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    scheduler.set_timesteps(steps)
    init = min(int(steps * strength), steps)
    if init < 1:
        raise ValueError(f"strength {strength} of {steps} steps runs no step")
    return scheduler.timesteps[(steps - init) * scheduler.order:].numpy().astype(np.int64)


def latent_mask(mask: np.ndarray, factor: int = VAE_FACTOR) -> np.ndarray:
    """The pixel mask [H, W] on the latent grid [H / factor, W / factor]: a cell is set if any of its pixels is."""
    mask = np.asarray(mask, bool)
    h, w = mask.shape
    if h % factor or w % factor:
        raise ValueError(f"mask {h}x{w} is not a multiple of the latent factor {factor}")
    return mask.reshape(h // factor, factor, w // factor, factor).any(axis=(1, 3))


def latent_sdedit_models(size: str = "small", seed: int = 0) -> dict[str, tuple[object, dict[str, object]]]:
    """The zoo's VAE encoder, SD UNet and VAE decoder at matching sizes, as ``{"encoder", "unet",
    "decoder"}`` -> ``(module, example inputs)`` to compile.

    ``size="small"``: the small UNet (16x16 latent, batch 2) with the small VAE (channels 16..32) run
    at 128 px, so its latent is 16x16 too (the VAE is fully convolutional: only the example inputs
    change, not the factory's 64-px default). ``"medium"``: the medium UNet (64x64 latent) with the
    full SD v1 VAE at its native 512 px. ``"full"``: the SD 1.5 UNet (does not compile yet: over 2
    GiB of weights). The encoder and the decoder are the two halves of one autoencoder (same seed).
    """
    import torch

    from sigec.apps.zoo import sd_unet, sd_vae_decoder, sd_vae_encoder

    unet, unet_inputs = sd_unet(size=size, batch=2, seed=seed)
    side = int(unet_inputs["sample"].shape[-1])
    encoder, enc_inputs = sd_vae_encoder(small=size == "small", seed=seed)
    decoder, dec_inputs = sd_vae_decoder(small=size == "small", seed=seed)
    if enc_inputs["image"].shape[-1] != side * VAE_FACTOR:
        generator = torch.Generator().manual_seed(seed)
        enc_inputs = {"image": torch.rand(1, 3, side * VAE_FACTOR, side * VAE_FACTOR, generator=generator) * 2 - 1}
        dec_inputs = {"latent": torch.randn(1, 4, side, side, generator=generator)}
    return {"encoder": (encoder, enc_inputs), "unet": (unet, unet_inputs),
            "decoder": (decoder, dec_inputs)}


STAGES = ("encode", "unet", "decode")


@dataclass
class LatentSdeditResult(_FinalImages):
    """Final images (decoder outputs [1, 3, H, W], not clipped) and measurements of one latent SDEdit.

    ``dense_s`` / ``sparse_s``: seconds per stage (``encode``, ``unet``: every step with the CFG and
    scheduler arithmetic, ``decode``); ``paths`` / ``mac_reductions``: per stage, one entry per
    engine run of the sparse pipeline; ``cache_bytes``: per engine, all its keys of this run.
    """

    original: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    timesteps: list[int]
    unet_mask: np.ndarray
    decoder_mask: np.ndarray
    unet_batch: int
    prime_s: float
    dense_s: dict[str, float]
    sparse_s: dict[str, float]
    paths: dict[str, list[str]]
    mac_reductions: dict[str, list[float]]
    cache_bytes: dict[str, int]

    @property
    def speedup(self) -> float:
        """The whole dense pipeline's time over the whole sparse pipeline's (priming excluded)."""
        return sum(self.dense_s.values()) / sum(self.sparse_s.values())

    @property
    def rel_l2(self) -> float:
        """Relative L2 error of the sparse final image against the dense one."""
        dense = self.dense.astype(np.float64)
        return float(np.linalg.norm(self.sparse - dense) / (np.linalg.norm(dense) + 1e-12))



def _input(engine: Engine, name: str) -> dict[str, object]:
    specs = {i["name"]: i for i in engine.manifest["inputs"]}
    if name not in specs:
        raise ValueError(f"expected an engine with input {name!r}, got inputs {sorted(specs)}")
    return specs[name]


def latent_sdedit(encoder: Engine | str | os.PathLike, unet: Engine | str | os.PathLike,
                  decoder: Engine | str | os.PathLike, original: np.ndarray, edited: np.ndarray, mask: np.ndarray, *,
                  steps: int = 20, strength: float = 0.3, guidance_scale: float = 7.5, seed: int = 0,
                  text_embeddings: np.ndarray | None = None, negative_embeddings: np.ndarray | None = None,
                  noise: np.ndarray | None = None, scheduler=None, warmup: bool = True,
                  threads: int | None = None) -> LatentSdeditResult:
    """Edit ``original`` into ``edited`` ([1, 3, H, W] in [-1, 1]; ``mask`` the edited pixels [H, W])
    with Stable Diffusion img2img, densely and with sigec's engines, and measure both.

    Engines: ``encoder`` (input ``image``), ``unet`` (``sample`` [2, 4, h, w], ``timestep`` [2],
    ``encoder_hidden_states`` [2, L, D]: classifier-free guidance in one batch) and ``decoder``
    (``latent``), compiled from :func:`latent_sdedit_models`. The original's run primes them
    (encoder and decoder at key 0, the UNet at ``key=step`` for each step); the edit then runs
    sparsely: the encoder with ``mask``, the UNet with ``mask`` on the latent grid
    (:func:`latent_mask`, shared by the batch), the decoder with the latent cells where the edit's
    final latent differs from the original's (the region the UNet recomputed). The dense pipeline
    runs the same three models with ``run_dense``. Both trajectories use the same noise. The
    stages run one after the other (prime, sparse, dense per engine); the times are per stage.

    ``text_embeddings`` / ``negative_embeddings`` [1, L, D] stand for the CLIP outputs of the prompt
    and of the empty prompt, ``noise`` [1, 4, h, w] is the img2img noise (defaults: standard normal
    from ``seed``, drawn in that order). ``scheduler``: a diffusers scheduler (default
    :func:`sd_ddim_scheduler`). ``warmup`` runs every engine's sparse and dense path once before
    the timed runs (first-run costs of ONNX Runtime sessions). Every key an engine holds for
    ``0..n-1`` is replaced. An engine given as a file path is loaded (with ``threads``) when its
    stage starts and released with its caches after it, so that one stage's sessions and caches
    are in memory at a time (ONNX Runtime's arenas keep a session's peak memory until it is
    released); ``cache_bytes`` still reports them.
    """
    import torch

    scheduler = sd_ddim_scheduler() if scheduler is None else scheduler
    timesteps = img2img_timesteps(scheduler, steps, strength)
    keys = range(len(timesteps))
    unet_mask = latent_mask(mask)
    rng = np.random.default_rng(seed)
    paths: dict[str, list[str]] = {s: [] for s in STAGES}
    reductions: dict[str, list[float]] = {s: [] for s in STAGES}
    prime_s, sparse_s, dense_s, cache_bytes = [0.0], {}, {}, {}

    def sparse(engine: Engine, stage: str, inputs: dict[str, np.ndarray], run_mask: np.ndarray,
               key: int) -> list[np.ndarray]:
        out = engine.run(inputs, mask=run_mask, key=key)
        paths[stage].append(engine.stats.path)
        reductions[stage].append(engine.stats.mac_reduction)
        return out

    def timed(call):
        begin = time.perf_counter()
        value = call()
        return value, time.perf_counter() - begin

    def staged(engine: Engine | str | os.PathLike, stage: str, keys, work):
        """Run one stage on ``engine`` (loaded here from a path, and released after); record its caches."""
        owned = not isinstance(engine, Engine)
        if owned:
            import sigec

            engine = sigec.load(engine, threads=threads)
        try:
            value = work(engine)
            cache_bytes[stage] = sum(engine.cache_bytes(key) for key in keys)
        finally:
            if owned:
                for key in keys:
                    engine.drop(key)
                del engine
                gc.collect()
        return value

    # Stage by stage: prime on the original's run (once per editing session, not part of the edit's
    # time), warm up, run the edit sparsely, then densely.
    def encode(engine: Engine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        _input(engine, "image")
        z_original, seconds = timed(lambda: engine.prime({"image": original}, key=0)[0])
        prime_s[0] += seconds
        if warmup:  # first runs of the DENSE and SPARSE sessions, outside the timed pipelines
            engine.run_dense({"image": edited})
            engine.run({"image": edited}, mask=mask, key=0)
        z_sparse, sparse_s["encode"] = timed(lambda: sparse(engine, "encode", {"image": edited}, mask, 0)[0])
        z_dense, dense_s["encode"] = timed(lambda: engine.run_dense({"image": edited})[0])
        return z_original, z_sparse, z_dense

    z_original, z_sparse, z_dense = staged(encoder, "encode", [0], encode)

    def denoise_all(engine: Engine) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        sample = _input(engine, "sample")
        t_dtype = np.dtype(_input(engine, "timestep")["dtype"])
        context = _input(engine, "encoder_hidden_states")
        batch = int(sample["shape"][0])
        if batch != 2:
            raise ValueError(f"classifier-free guidance needs a UNet engine of batch 2, got {batch}")
        shape = (1, int(context["shape"][1]), int(context["shape"][2]))
        text = rng.standard_normal(shape).astype(np.float32) if text_embeddings is None else text_embeddings
        negative = rng.standard_normal(shape).astype(np.float32) if negative_embeddings is None else negative_embeddings
        prompt = np.concatenate([negative, text]).astype(np.float32)  # unconditional, conditional
        eps_noise = rng.standard_normal((1, *sample["shape"][1:])) if noise is None else noise
        eps_noise = torch.from_numpy(np.asarray(eps_noise, np.float32))

        def feeds(latents: np.ndarray, step: int) -> dict[str, np.ndarray]:
            doubled = scheduler.scale_model_input(torch.from_numpy(np.concatenate([latents] * 2)),
                                                  int(timesteps[step]))
            return {"sample": doubled.numpy(), "timestep": np.full((2,), timesteps[step], t_dtype),
                    "encoder_hidden_states": prompt}

        def denoise(image_latent: np.ndarray, predict) -> np.ndarray:
            """The img2img loop from the encoder's latent mean; ``predict(feeds, step)`` runs the UNet."""
            latents = scheduler.add_noise(torch.from_numpy(image_latent * np.float32(VAE_SCALING_FACTOR)),
                                          eps_noise, torch.tensor(timesteps[:1]))
            for step, t in enumerate(timesteps):
                uncond, cond = predict(feeds(latents.numpy(), step), step)[0]
                eps = uncond + np.float32(guidance_scale) * (cond - uncond)
                latents = scheduler.step(torch.from_numpy(eps[None]), int(t), latents, return_dict=False)[0]
            return (latents.numpy() / np.float32(VAE_SCALING_FACTOR)).astype(np.float32)

        l_original, seconds = timed(lambda: denoise(z_original, lambda f, step: engine.prime(f, key=step)))
        prime_s[0] += seconds
        if warmup:
            warm = feeds(z_original, 0)
            engine.run_dense(warm)
            engine.run(warm, mask=unet_mask, key=0)
        l_sparse, sparse_s["unet"] = timed(
            lambda: denoise(z_sparse, lambda f, step: sparse(engine, "unet", f, unet_mask, step)))
        l_dense, dense_s["unet"] = timed(lambda: denoise(z_dense, lambda f, step: engine.run_dense(f)))
        return batch, l_original, l_sparse, l_dense

    batch, l_original, l_sparse, l_dense = staged(unet, "unet", keys, denoise_all)

    def decode(engine: Engine) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        _input(engine, "latent")
        original_image, seconds = timed(lambda: engine.prime({"latent": l_original}, key=0)[0])
        prime_s[0] += seconds
        if warmup:
            engine.run_dense({"latent": l_original})
            engine.run({"latent": l_original}, mask=unet_mask, key=0)
        masks: list[np.ndarray] = []

        def decode_sparse() -> np.ndarray:  # the decoder's mask is part of the sparse pipeline's time
            masks.append(np.abs(l_sparse - l_original).max(axis=1)[0] > 0)
            return sparse(engine, "decode", {"latent": l_sparse}, masks[0], 0)[0]

        sparse_image, sparse_s["decode"] = timed(decode_sparse)
        dense_image, dense_s["decode"] = timed(lambda: engine.run_dense({"latent": l_dense})[0])
        return original_image, sparse_image, dense_image, masks[0]

    original_image, sparse_image, dense_image, decoder_mask = staged(decoder, "decode", [0], decode)
    return LatentSdeditResult(
        original=original_image, dense=dense_image, sparse=sparse_image, timesteps=[int(t) for t in timesteps],
        unet_mask=unet_mask, decoder_mask=decoder_mask, unet_batch=batch, prime_s=prime_s[0], dense_s=dense_s,
        sparse_s=sparse_s, paths=paths, mac_reductions=reductions, cache_bytes=cache_bytes)


def save_latent_panels(path: str | pathlib.Path, original: np.ndarray, edited: np.ndarray, mask: np.ndarray,
                       result: LatentSdeditResult, title: str = "") -> pathlib.Path:
    """Save original, edited input with the mask overlaid, the original's result, dense result, sparse
    result and |sparse - dense| as a PNG. Results are shown as pipelines post-process them: clipped to [-1, 1]."""
    overlay = _rgb(edited).copy()
    overlay[mask] = 0.5 * overlay[mask] + 0.5 * np.array([1.0, 1.0, 0.0])
    difference = np.abs(result.sparse - result.dense)[0].max(axis=0)
    panels = [("original", _rgb(original)), ("edit + mask (yellow)", overlay), ("original's result", _rgb(result.original)),
              ("dense result", _rgb(result.dense)), ("sigec sparse result", _rgb(result.sparse)),
              (f"|sparse - dense| (max {difference.max():.2g})", difference)]
    return _save_row(path, panels, title)
