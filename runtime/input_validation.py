"""Checks on what a caller hands to the engine: inputs, mask options, non-spatial inputs.

Every refusal is an ``InputError`` naming the input (or option) and what was expected. Masks are
normalised by ``sigec.core.mask_program.normalize_mask``.

Dtype rule for an input declared with dtype D:

- same dtype: accepted as is;
- D floating: any floating array is converted to D (float64, numpy's default, and float16 to
  float32); the values are checked to be finite after the conversion, so an overflow is reported;
- D integer: any integer array that numpy casts to D within its kind (int32 -> int64, ...);
- anything else is refused, in particular integer or boolean data for a floating input: its scale
  is unknown (0..255 pixels fed to a model that expects normalised values give garbage), so the
  caller converts it explicitly, scaled as the model expects.

Finite values: floating inputs are checked for NaN and Inf over the whole array, except the inputs
a caller defers (``defer_finite``): ``Engine.run`` defers its spatial inputs when a mask is given
without ``update_cache``, then checks them only inside the bounding box of the active tiles of the
input's resolution (``check_finite_in_tiles``; the tiles cover the dilated mask) before a sparse
run, as that run reads the edited values only there (outside the mask they must equal the primed
ones, which were checked), or wholly (``check_finite``) before a dense one. An input converted from another dtype
is always checked wholly: the conversion already read it all.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Hashable, Mapping, Sequence

import numpy as np

from sigec.core.errors import InputError

Inputs = Mapping[str, np.ndarray] | Sequence[np.ndarray]


def validate_inputs(inputs: Inputs, specs: Sequence[Mapping[str, Any]], *,
                    defer_finite: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Validated C-contiguous arrays by input name (``specs``: the manifest's inputs, in declaration order).

    ``inputs`` is a mapping name -> array with exactly the declared names, or a sequence (or a
    single array) in declaration order. Inputs named in ``defer_finite`` are not checked for
    finite values unless converted (the caller checks them later; module docstring).
    """
    by_name = {s["name"]: s for s in specs}
    if isinstance(inputs, Mapping):
        unknown = [k for k in inputs if k not in by_name]
        if unknown:
            raise InputError(f"unknown input name(s) {unknown}; the engine's inputs are {list(by_name)}")
        missing = [k for k in by_name if k not in inputs]
        if missing:
            raise InputError(f"missing input(s) {missing}; the engine's inputs are {list(by_name)}")
        items = dict(inputs)
    elif isinstance(inputs, np.ndarray) or (isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes))):
        seq = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
        if len(seq) != len(by_name):
            raise InputError(f"expected {len(by_name)} inputs ({list(by_name)}), got {len(seq)}")
        items = dict(zip(by_name, seq))
    else:
        raise InputError(f"inputs must be a mapping from input name to array or a sequence of arrays in the "
                         f"order {list(by_name)}, got {type(inputs).__name__}")
    return {name: validate_input(name, value, by_name[name], finite=name not in defer_finite)
            for name, value in items.items()}


def validate_input(name: str, value: Any, spec: Mapping[str, Any], *, finite: bool = True) -> np.ndarray:
    """``value`` as a C-contiguous array of the declared dtype and shape (dtype rule: module docstring);
    with ``finite=False`` its values are checked only if it was converted."""
    try:
        array = np.asarray(value)
    except Exception as exc:
        raise InputError(f"input '{name}' is not an array: {exc}") from exc
    want = np.dtype(spec["dtype"])
    converted_from = None
    if array.dtype != want:
        _check_conversion(name, array.dtype, want)
        converted_from = array.dtype
        if want.kind in "iu" and array.dtype.kind in "iu" and array.size:
            _check_integer_range(name, array, want)
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below as non-finite
            array = array.astype(want)
    if list(array.shape) != list(spec["shape"]):
        raise InputError(f"input '{name}' has shape {list(array.shape)}, expected {list(spec['shape'])}")
    if finite or converted_from is not None:
        check_finite(name, array, converted_from)
    return np.asarray(array, order="C")


def _check_integer_range(name: str, array: np.ndarray, want: np.dtype) -> None:
    """Refuse integer data that ``want`` cannot hold (int64 -> int32 would wrap silently)."""
    info = np.iinfo(want)
    low, high = int(array.min()), int(array.max())
    if low < info.min or high > info.max:
        raise InputError(f"input '{name}' holds values in [{low}, {high}], outside the range of its declared "
                         f"dtype {want} [{info.min}, {info.max}]")


def check_finite(name: str, array: np.ndarray, converted_from: np.dtype | None = None) -> None:
    """Refuse NaN or Inf anywhere in a floating ``array`` (``converted_from``: its dtype before conversion)."""
    if array.dtype.kind != "f":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        after = f" after conversion from {converted_from} to {array.dtype}" if converted_from is not None else ""
        raise InputError(f"input '{name}' contains {int(bad.sum())} NaN or Inf value(s){after}, the first at "
                         f"index {first}; sigec refuses non-finite inputs")


def check_finite_in_tiles(name: str, array: np.ndarray, coords: np.ndarray, tile: int) -> None:
    """Refuse NaN or Inf in a floating ``array`` [B, C, H, W] inside the bounding box of the tiles
    ``coords`` [N, 3] (b, ty, tx) of size ``tile``, over every batch item; the work is proportional
    to the box, not to the array."""
    if array.dtype.kind != "f" or coords.shape[0] == 0:
        return
    top, left = int(coords[:, 1].min()) * tile, int(coords[:, 2].min()) * tile
    bottom, right = (int(coords[:, 1].max()) + 1) * tile, (int(coords[:, 2].max()) + 1) * tile
    box = array[:, :, top:bottom, left:right]
    if np.isfinite(box).all():
        return
    bad = np.argwhere(~np.isfinite(box))
    first = tuple(int(i) for i in bad[0] + (0, 0, top, left))
    raise InputError(f"input '{name}' contains {len(bad)} NaN or Inf value(s) inside the edited region (rows "
                     f"{top}..{min(bottom, array.shape[2]) - 1}, columns {left}..{min(right, array.shape[3]) - 1}), "
                     f"the first at index {first}; sigec refuses non-finite inputs")


def _check_conversion(name: str, have: np.dtype, want: np.dtype) -> None:
    """Raise ``InputError`` unless an array of dtype ``have`` may be converted to ``want``."""
    if want.kind == "f" and have.kind == "f":
        return
    if want.kind in "iu" and have.kind in "iu" and np.can_cast(have, want, "same_kind"):
        return
    if want.kind == "f" and have.kind in "biu":
        raise InputError(f"input '{name}' has dtype {have}, expected {want}; sigec does not convert integer or "
                         f"boolean data to floats, as it cannot know the scale the model expects (0..255 pixels fed "
                         f"to a model that expects normalised values give garbage): convert it yourself, e.g. "
                         f"arr.astype(np.{want.name}), scaled as the model expects (such as / 255 for 8-bit "
                         f"pixels into [0, 1])")
    raise InputError(f"input '{name}' has dtype {have}, expected {want} (or a numeric dtype that converts to it)")


def check_mask_options(threshold: float | None, dilation: int | None) -> None:
    """Refuse a threshold that is not a finite number >= 0 and a dilation that is not an integer >= 0."""
    if threshold is not None:
        try:
            value = float(threshold)
        except (TypeError, ValueError) as exc:
            raise InputError(f"threshold must be a number, got {threshold!r}") from exc
        if not math.isfinite(value) or value < 0:
            raise InputError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if dilation is not None:
        if isinstance(dilation, bool) or not isinstance(dilation, (int, np.integer)) or dilation < 0:
            raise InputError(f"dilation must be an integer >= 0 (pixels), got {dilation!r}")


def check_static_inputs(feeds: Mapping[str, np.ndarray], primed: Mapping[str, np.ndarray],
                        spatial: Sequence[str], key: Hashable) -> None:
    """Refuse a non-spatial input (not in ``spatial``) that differs from the value primed for ``key``.

    Non-spatial inputs (a timestep, a style vector) are baked into the key's caches, so a run with
    another value would silently mix two states.
    """
    for name, value in feeds.items():
        if name not in spatial and not np.array_equal(value, primed[name]):
            raise InputError(f"input '{name}' differs from the value primed for key {key!r}; non-spatial inputs "
                             f"(e.g. a timestep) select the cache: prime a key with this value")
