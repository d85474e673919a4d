"""ONNX Resize coordinates and nearest rounding: the one rule the compiler and the executors share.

Coordinates are computed per axis in numpy float32, in the operation order of the ONNX formulas
and of ONNX Runtime, so that the compiler's choice of a sparse geometry for a nearest Resize
(passes/sparse_rules.py) and the PyTorch executor (runtime/torch_onnx_ops_resize.py) read the
same input pixel as ONNX Runtime does, also where float32 rounding moves a coordinate across an
integer.
"""

from __future__ import annotations

import numpy as np

COORDINATE_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                    "tf_crop_and_resize")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")

# A fractional part within this distance of 0.5 is a tie for the round_prefer_* modes: float32
# coordinates of exact ties (e.g. 2 / (4 / 7) = 3.5) may land a few ulps off 0.5. ONNX Runtime
# uses the same tolerance.
TIE_TOLERANCE = 1e-6


def original_coordinates(out_size: int, in_size: int, scale: float, mode: str, roi_start: float = 0.0,
                         roi_end: float = 1.0) -> np.ndarray:
    """The float32 input coordinate of every output position along one axis.

    ``scale`` is the axis' float32 scale (``out_size / in_size`` unless the model gives scales);
    ``mode`` is the ``coordinate_transformation_mode``; ``roi_*`` are used by ``tf_crop_and_resize``.
    """
    f32 = np.float32
    x = np.arange(out_size, dtype=f32)
    scale32, half, one = f32(scale), f32(0.5), f32(1)
    length_out, length_in = f32(out_size), f32(in_size)
    if mode == "half_pixel":
        return (x + half) / scale32 - half
    if mode == "half_pixel_symmetric":
        adjustment = length_out / (scale32 * length_in)
        offset = (length_in / f32(2)) * (one - adjustment)
        # ONNX Runtime evaluates this last expression in double (its 0.5 literals are doubles).
        x64 = x.astype(np.float64)
        return (np.float64(offset) + (x64 + 0.5) / np.float64(scale32) - 0.5).astype(f32)
    if mode == "pytorch_half_pixel":
        return (x + half) / scale32 - half if out_size > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * (length_in - one) / (length_out - one) if out_size > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale32
    if mode == "tf_crop_and_resize":
        start, end = f32(roi_start), f32(roi_end)
        if out_size > 1:
            return start * (length_in - one) + x * (end - start) * (length_in - one) / (length_out - one)
        return np.full_like(x, half * (start + end) * (length_in - one))
    raise ValueError(f"unknown coordinate_transformation_mode {mode!r}")


def nearest_index(coord: np.ndarray, nearest_mode: str, downsampling: bool) -> np.ndarray:
    """Round input coordinates to pixel indices (``nearest_mode``); not clipped to the input."""
    floor = np.floor(coord)
    frac = coord - floor
    tie = np.abs(frac - np.float32(0.5)) <= TIE_TOLERANCE
    if nearest_mode == "round_prefer_floor":
        index = np.where(tie | (frac < 0.5), floor, floor + 1)
    elif nearest_mode == "round_prefer_ceil":
        index = np.where(tie | (frac > 0.5), floor + 1, floor)
    elif nearest_mode == "floor":
        index = floor
    elif nearest_mode == "ceil":
        index = np.ceil(coord)
    elif nearest_mode == "simple":  # opset < 11 Resize/Upsample: truncate, ceil when downsampling
        index = np.ceil(coord) if downsampling else np.trunc(coord)
    else:
        raise ValueError(f"unknown nearest_mode {nearest_mode!r}")
    return index.astype(np.int64)


def nearest_source_index(out_size: int, in_size: int, mode: str, nearest_mode: str) -> np.ndarray:
    """The input index a nearest Resize from ``in_size`` to ``out_size`` reads at every output index."""
    scale = float(np.float32(out_size) / np.float32(in_size))
    coord = original_coordinates(out_size, in_size, scale, mode)
    return np.clip(nearest_index(coord, nearest_mode, scale < 1), 0, in_size - 1)
