"""Synthetic inputs and edits for measuring engines (benchmarks, the profiler, autotuning)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np


def square_mask(height: int, width: int, fraction: float) -> np.ndarray:
    """A centred square (clipped to the image) covering about ``fraction`` of the pixels."""
    mask = np.zeros((height, width), bool)
    if fraction <= 0:
        return mask
    side = int(round(np.sqrt(fraction * height * width)))
    side_h, side_w = min(side, height), min(side, width)
    if side_h * side_w < fraction * height * width and side_h == height:
        side_w = min(width, int(np.ceil(fraction * height * width / height)))
    y0, x0 = (height - side_h) // 2, (width - side_w) // 2
    mask[y0:y0 + side_h, x0:x0 + side_w] = True
    return mask


def edit_inputs(original: Mapping[str, np.ndarray], spatial: Sequence[str], mask: np.ndarray,
                seed: int = 1) -> dict[str, np.ndarray]:
    """The original inputs with random noise added inside ``mask`` on every spatial input."""
    rng = np.random.default_rng(seed)
    edited = {k: v.copy() for k, v in original.items()}
    for name in spatial:
        x = edited[name]
        noise = rng.standard_normal(x.shape).astype(x.dtype) * 0.5
        edited[name] = x + noise * mask[None, None]
    return edited


def random_inputs(manifest: Mapping[str, Any], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs fitting an engine's input specs: standard normal floats, integers in [0, 10)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in manifest["inputs"]:
        dtype = np.dtype(spec["dtype"])
        if dtype.kind == "f":
            inputs[spec["name"]] = rng.standard_normal(spec["shape"]).astype(dtype)
        else:
            inputs[spec["name"]] = rng.integers(0, 10, spec["shape"]).astype(dtype)
    return inputs
