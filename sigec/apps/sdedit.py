"""SDEdit-style image editing with a DDIM sampler, run densely and incrementally on one engine.

The loop (Meng et al., SDEdit; as benchmarked by SIGE): noise the original and the edited image to
the same intermediate timestep with the SAME noise, then denoise both with deterministic DDIM
(eta = 0). The original trajectory primes one cache per step (``key=step``); the edited trajectory
runs sparsely against those caches with the edit mask, and is compared with the dense loop.

Noise schedule: DDPM's linear betas 1e-4 .. 0.02 over 1000 training steps.
"""

from __future__ import annotations

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


@dataclass
class SdeditResult:
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
    def psnr_sparse_vs_dense(self) -> float:
        """PSNR of the sparse edit against the dense edit (dB)."""
        return psnr(self.sparse, self.dense)

    @property
    def psnr_original_vs_dense(self) -> float:
        """PSNR of the unedited result against the dense edit: what ignoring the edit would give."""
        return psnr(self.original, self.dense)

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


def save_panels(path: str | pathlib.Path, original: np.ndarray, edited: np.ndarray, result: SdeditResult,
                mask: np.ndarray, title: str = "") -> pathlib.Path:
    """Save original, edited, dense result, sparse result, mask and |sparse - dense| side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    difference = np.abs(result.sparse - result.dense)[0].max(axis=0)
    panels = [("original", _rgb(original)), ("edited input", _rgb(edited)), ("dense SDEdit", _rgb(result.dense)),
              ("sigec sparse SDEdit", _rgb(result.sparse)), ("mask", mask if mask.ndim == 2 else mask[0]),
              (f"|sparse - dense| (max {difference.max():.2g})", difference)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4))
    for ax, (name, picture) in zip(axes, panels):
        if picture.ndim == 2:  # masks and error maps: grey, scaled to their own maximum
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
