"""ONNX Resize and Upsample, implemented separably: one index/weight computation per resized axis.

Coordinates and weights are small per-axis vectors computed on the host in numpy float32, in the
operation order of the ONNX formulas (and of ONNX Runtime), so that nearest-rounding decisions do
not depend on the device; coordinates and nearest rounding are the contract layer's rule
(sigec/core/resize_rules.py), which the compiler's sparse Resize geometry uses too. Linear and cubic interpolation along several axes is the product of
per-axis interpolations, which equals the ONNX n-linear/n-cubic definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sigec.core.resize_rules import nearest_index, original_coordinates

from .torch_onnx_ops_common import Inputs, NodeAttrs, OpFn, normalize_axis, opt, present, to_ints


@dataclass(frozen=True)
class _AxisResize:
    """How one axis is resized."""

    axis: int
    in_size: int
    out_size: int
    scale: float  # float32 value
    roi_start: float = 0.0
    roi_end: float = 1.0


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution weights of the taps at offsets -1, 0, 1, 2 for fractions ``t``."""
    d = np.stack([1 + t, t, 1 - t, 2 - t], axis=-1).astype(np.float32)
    a = np.float32(a)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, far).astype(np.float32)


def _take(data: torch.Tensor, axis: int, index: np.ndarray) -> torch.Tensor:
    """``data`` at ``index`` along ``axis``."""
    return data.index_select(axis, torch.from_numpy(np.ascontiguousarray(index)).to(data.device))


def _weighted(data: torch.Tensor, axis: int, weight: np.ndarray) -> torch.Tensor:
    """Multiply by a per-position weight along ``axis``."""
    shape = [1] * data.dim()
    shape[axis] = -1
    w = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)).to(device=data.device, dtype=data.dtype)
    return data * w.reshape(shape)


def _resize_axis(
    data: torch.Tensor, a: _AxisResize, attrs: NodeAttrs, mode: str, coord_mode: str
) -> tuple[torch.Tensor, np.ndarray]:
    """Resize one axis; also return which output positions fall outside the input (tf_crop_and_resize)."""
    coord = original_coordinates(a.out_size, a.in_size, a.scale, coord_mode, a.roi_start, a.roi_end)
    last = a.in_size - 1
    outside = (coord < 0) | (coord > last)
    if mode == "nearest":
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor") if attrs.opset >= 11 else "simple"
        index = np.clip(nearest_index(coord, nearest_mode, a.scale < 1), 0, last)
        return _take(data, a.axis, index), outside
    if mode == "linear":
        coord = np.clip(coord, np.float32(0), np.float32(last))
        lo = np.minimum(np.floor(coord).astype(np.int64), last)
        hi = np.minimum(lo + 1, last)
        w_lo, w_hi = hi.astype(np.float32) - coord, coord - lo.astype(np.float32)
        same = lo == hi
        w_lo, w_hi = np.where(same, 0.5, w_lo), np.where(same, 0.5, w_hi)
        out = _weighted(_take(data, a.axis, lo), a.axis, w_lo) + _weighted(_take(data, a.axis, hi), a.axis, w_hi)
        return out, outside
    if mode == "cubic":
        base = np.floor(coord)
        weights = _cubic_weights(coord - base, float(attrs.get("cubic_coeff_a", -0.75)))
        taps = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
        if attrs.get("exclude_outside", 0):
            weights = np.where((taps < 0) | (taps > last), np.float32(0), weights)
            weights = weights / weights.sum(axis=1, keepdims=True)
        taps = np.clip(taps, 0, last)
        out = sum(_weighted(_take(data, a.axis, taps[:, i]), a.axis, weights[:, i]) for i in range(4))
        return out, outside
    raise ValueError(f"unknown Resize mode {mode!r}")


def _axis_plans(
    attrs: NodeAttrs,
    data: torch.Tensor,
    roi: list[float] | None,
    scales: list[float] | None,
    sizes: list[int] | None,
) -> list[_AxisResize]:
    """Per-axis output sizes and scales from ``scales`` or ``sizes`` (with ``axes`` and
    ``keep_aspect_ratio_policy``), following ONNX Runtime's float32 arithmetic."""
    rank = data.dim()
    axes = [normalize_axis(a, rank) for a in attrs.ints("axes", range(rank))]
    in_sizes = [data.shape[a] for a in axes]
    if sizes is not None:
        out_sizes = sizes
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy != "stretch":
            ratios = [np.float32(o) / np.float32(i) for o, i in zip(out_sizes, in_sizes)]
            ratio = min(ratios) if policy == "not_larger" else max(ratios)
            out_sizes = [int(math.floor(float(ratio * np.float32(i)) + 0.5)) for i in in_sizes]
            scale_list = [ratio] * len(axes)
        else:
            scale_list = [np.float32(o) / np.float32(i) for o, i in zip(out_sizes, in_sizes)]
    else:
        scale_list = [np.float32(s) for s in scales]
        out_sizes = [int(np.float32(s) * np.float32(i)) for s, i in zip(scale_list, in_sizes)]
    roi = roi if roi is not None else [0.0] * len(axes) + [1.0] * len(axes)
    n = len(roi) // 2
    roi_axes = axes if n == len(axes) else list(range(rank))
    roi_of = {ax: (roi[k], roi[k + n]) for k, ax in enumerate(roi_axes)}
    return [
        _AxisResize(ax, i, o, float(s), *roi_of.get(ax, (0.0, 1.0)))
        for ax, i, o, s in zip(axes, in_sizes, out_sizes, scale_list)
    ]


def _resize(attrs: NodeAttrs, data: torch.Tensor, plans: list[_AxisResize], mode: str, coord_mode: str) -> torch.Tensor:
    """Apply the per-axis resizes; fill extrapolated positions for tf_crop_and_resize."""
    if mode in ("linear", "cubic") and attrs.get("antialias", 0) and any(p.scale < 1 for p in plans):
        raise NotImplementedError("Resize with antialias=1 when downsampling is not supported")
    if coord_mode != "tf_crop_and_resize" and all(p.in_size == p.out_size for p in plans):
        return data  # a resize that keeps the shape is a copy (as ONNX Runtime does, whatever the scales)
    out_dtype = data.dtype
    work = data if data.is_floating_point() or mode == "nearest" else data.float()
    outside_mask = np.zeros([1] * data.dim(), dtype=bool)
    for plan in plans:
        if plan.in_size == plan.out_size and plan.scale == 1.0 and coord_mode != "tf_crop_and_resize":
            continue
        work, outside = _resize_axis(work, plan, attrs, mode, coord_mode)
        shape = [1] * data.dim()
        shape[plan.axis] = -1
        outside_mask = outside_mask | outside.reshape(shape)
    if coord_mode == "tf_crop_and_resize":
        outside_mask = torch.from_numpy(outside_mask).to(work.device)
        fill = torch.tensor(attrs.get("extrapolation_value", 0.0), dtype=work.dtype, device=work.device)
        work = torch.where(outside_mask, fill, work)
    return work.to(out_dtype)


def resize(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """ONNX Resize (opsets 10-19): modes nearest/linear/cubic, every coordinate transformation
    and nearest mode, ``scales`` or ``sizes`` (with ``axes``, ``keep_aspect_ratio_policy``)."""
    data = x[0]
    if attrs.opset < 11:
        roi, scales, sizes = None, x[1], None
    else:
        roi, scales, sizes = opt(x, 1), opt(x, 2), opt(x, 3)
    roi_list = [float(v) for v in roi.reshape(-1).tolist()] if present(roi) else None
    sizes_list = to_ints(sizes) if present(sizes) else None
    scales_list = [float(v) for v in scales.reshape(-1).tolist()] if present(scales) else None
    if sizes_list is None and scales_list is None:
        raise ValueError("Resize needs scales or sizes")
    coord_mode = attrs.get("coordinate_transformation_mode", "half_pixel") if attrs.opset >= 11 else "asymmetric"
    plans = _axis_plans(attrs, data, roi_list, scales_list, sizes_list)
    return _resize(attrs, data, plans, attrs.get("mode", "nearest"), coord_mode)


def upsample(attrs: NodeAttrs, x: Inputs) -> torch.Tensor:
    """Deprecated Upsample (opsets 7/9): Resize with ``asymmetric`` coordinates; ``scales`` is an
    input (opset 9) or attribute (7); nearest truncates."""
    data = x[0]
    scales = [float(v) for v in x[1].reshape(-1).tolist()] if opt(x, 1) is not None else attrs["scales"]
    legacy = NodeAttrs(attrs.values, opset=10, num_outputs=1, device=attrs.device)
    mode = {"bilinear": "linear"}.get(attrs.get("mode", "nearest"), attrs.get("mode", "nearest"))
    plans = _axis_plans(legacy, data, None, scales, None)
    return _resize(legacy, data, plans, mode, "asymmetric")


RESIZE_OPS: dict[str, OpFn] = {"Resize": resize, "Upsample": upsample}
