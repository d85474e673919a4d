"""``sigec demo``: compile the built-in generator, edit an image, run it incrementally, show the result.

The generator (``tiny_local`` from the zoo) has random weights: sigec ships no trained model, so its
outputs are not meaningful images. The demo shows speed and exactness, not image quality.
"""

from __future__ import annotations

import pathlib
import statistics
import time

import numpy as np

from sigec.runtime.synthetic_edits import square_mask

RANDOM_WEIGHTS_NOTE = ("the demo model tiny_local has random weights (sigec ships no trained generator), so its "
                       "outputs are not meaningful images: the demo shows speed and exactness, not image quality")
"""Printed by the demo and shown in ``sigec demo --help``."""


def _smooth_image(size: int, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image in [-1, 1], shape [1, 3, size, size]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    channels = []
    for _ in range(3):
        f = rng.uniform(1, 4, 2)
        p = rng.uniform(0, 2 * np.pi, 2)
        channels.append(0.8 * np.sin(2 * np.pi * f[0] * yy + p[0]) * np.cos(2 * np.pi * f[1] * xx + p[1]))
    return np.stack(channels)[None].astype(np.float32)


def _to_rgb(x: np.ndarray) -> np.ndarray:
    return np.clip((x[0].transpose(1, 2, 0) + 1) / 2, 0, 1)


def _median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run_demo(out_dir: pathlib.Path, *, backend: str = "ort", size: int = 256, edit: float = 0.012) -> dict[str, float]:
    """Compile ``tiny_local`` (exact mode, random weights), edit a square of ``edit`` of the image, compare
    sparse with dense; write ``tiny_local.sigec`` and, with matplotlib, ``demo.png`` into ``out_dir``."""
    import sigec
    from sigec.apps.zoo import build

    out_dir.mkdir(parents=True, exist_ok=True)
    module, example = build("tiny_local", size=size)
    name = next(iter(example))
    engine_path = sigec.compile(module, out_dir / "tiny_local.sigec", inputs=example, mode="exact", backend=backend,
                                progress=True)
    engine = sigec.load(engine_path, threads=2)
    original = _smooth_image(size)
    mask = square_mask(size, size, edit)
    edited = original.copy()
    edited[:, 0][:, mask] = 0.9  # paint a red square
    edited[:, 1][:, mask] = -0.9
    edited[:, 2][:, mask] = -0.9
    engine.prime({name: original})
    sparse = engine.run({name: edited})[0]
    stats = engine.stats
    dense = engine.run_dense({name: edited})[0]
    dense_ms = _median_ms(lambda: engine.run_dense({name: edited}))
    sparse_ms = _median_ms(lambda: engine.run({name: edited}))
    err = float(np.abs(sparse - dense).max() / np.abs(dense).max())
    result = {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
              "mac_reduction": stats.mac_reduction, "max_rel_error": err}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 5, figsize=(15, 3.4))
        panels = [("original", _to_rgb(original)), ("edited", _to_rgb(edited)), ("dense output", _to_rgb(dense)),
                  ("sigec sparse output", _to_rgb(sparse)), ("edit mask", mask)]
        for ax, (title, img) in zip(axes, panels):
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.set_title(title)
            ax.axis("off")
        fig.suptitle(f"sigec demo, random weights: {edit * 100:.1f}% edit, {result['speedup']:.1f}x faster than "
                     f"dense ({result['mac_reduction']:.1f}x fewer MACs), max rel. error {err:.1e}")
        fig.savefig(out_dir / "demo.png", dpi=80, bbox_inches="tight")
        plt.close(fig)
        picture = f", picture {out_dir / 'demo.png'}"
    except ImportError:
        picture = " (install matplotlib for the picture)"
    print(f"note: {RANDOM_WEIGHTS_NOTE}\n"
          f"engine {engine_path}{picture}\n"
          f"dense {dense_ms:.1f} ms, sparse {sparse_ms:.1f} ms: {result['speedup']:.2f}x faster, "
          f"{result['mac_reduction']:.2f}x fewer MACs, max relative error vs dense {err:.2e} (exact mode)")
    return result
