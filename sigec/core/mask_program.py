"""The mask program: turns a pixel mask into the tile index tensors of every resolution.

A mask program is plain JSON data stored in the engine manifest (no code). It is a list of
instructions over named boolean masks of shape ``[B, H, W]``; ``input`` is the pixel mask at the
spatial input's resolution. Each resolution names the mask whose active cells become its tiles.

Instructions (``op`` and fields):

- ``empty``: ``size`` -> an all-false mask;
- ``window``: ``src, kernel, stride, pads [t, l, b, r], dilation, size`` -> ``out[y, x]`` is true
  when any input position read by a sliding window (a convolution's receptive field) is true;
- ``transpose_window``: ``src, kernel, stride, pads, size`` -> the receptive field of a transposed
  convolution: ``out[o]`` is true when some ``i`` with ``o = i * stride - pad + k`` is true;
- ``upsample``: ``src, factor [fy, fx], size`` -> nearest-neighbour repetition;
- ``dilate``: ``src, radius`` -> square dilation;
- ``resample``: ``src, size`` -> conservative resampling to another size: an output cell is true
  when any input pixel it covers (or that covers it) is true;
- ``union``: ``srcs`` -> logical or.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from sigec.core.errors import InputError


@dataclass(frozen=True)
class TileIndex:
    """Active tiles of one resolution: ``coords`` [N, 3] (b, ty, tx) and ``grid`` [B, gh, gw]."""

    coords: np.ndarray
    grid: np.ndarray

    @property
    def count(self) -> int:
        """Number of active tiles."""
        return int(self.coords.shape[0])

    @property
    def fraction(self) -> float:
        """Active tiles over all tiles of the grid."""
        return self.count / max(self.grid.size, 1)


def _window_any(mask: np.ndarray, kernel: Sequence[int], stride: Sequence[int], pads: Sequence[int],
                dilation: Sequence[int], size: Sequence[int]) -> np.ndarray:
    b, h, w = mask.shape
    kh, kw = kernel
    sh, sw = stride
    dh, dw = dilation
    oh, ow = size
    # Pad generously so every window of the output fits, then slide.
    need_h = (oh - 1) * sh + (kh - 1) * dh + 1
    need_w = (ow - 1) * sw + (kw - 1) * dw + 1
    pt, pl = pads[0], pads[1]
    pb = max(need_h - h - pt, 0)
    pr = max(need_w - w - pl, 0)
    padded = np.zeros((b, h + pt + pb, w + pl + pr), dtype=bool)
    padded[:, pt:pt + h, pl:pl + w] = mask
    # Dilate along rows then columns (separable "any" over the window taps).
    rows = np.zeros((b, oh, padded.shape[2]), dtype=bool)
    for k in range(kh):
        start = k * dh
        rows |= padded[:, start:start + (oh - 1) * sh + 1:sh, :]
    out = np.zeros((b, oh, ow), dtype=bool)
    for k in range(kw):
        start = k * dw
        out |= rows[:, :, start:start + (ow - 1) * sw + 1:sw]
    return out


def _transpose_window_any(mask: np.ndarray, kernel: Sequence[int], stride: Sequence[int],
                          pads: Sequence[int], size: Sequence[int]) -> np.ndarray:
    b, h, w = mask.shape
    oh, ow = size
    out = np.zeros((b, oh, ow), dtype=bool)
    # Output positions each input row (column) reaches: [n, k] tables, one per axis.
    ys, xs = (np.arange(n)[:, None] * s - p + np.arange(k)[None, :]
              for n, k, s, p in zip((h, w), kernel, stride, pads[:2]))
    bi, iy, ix = np.nonzero(mask)  # every active input cell of every batch item at once
    if bi.size == 0:
        return out
    shape = (bi.size, ys.shape[1], xs.shape[1])
    bb = np.broadcast_to(bi[:, None, None], shape)
    yy = np.broadcast_to(ys[iy][:, :, None], shape)
    xx = np.broadcast_to(xs[ix][:, None, :], shape)
    keep = (yy >= 0) & (yy < oh) & (xx >= 0) & (xx < ow)
    out[bb[keep], yy[keep], xx[keep]] = True
    return out


def _or_blocks(mask: np.ndarray, axis: int, block: int) -> np.ndarray:
    """Logical or over consecutive runs of ``block`` cells along ``axis`` (whose length is a multiple of
    ``block``): one strided slice per offset in the block, much faster than ``any`` over a reshape."""
    def offset(k: int) -> np.ndarray:
        index: list[slice] = [slice(None)] * mask.ndim
        index[axis] = slice(k, None, block)
        return mask[tuple(index)]

    out = offset(0).copy()
    for k in range(1, block):
        out |= offset(k)
    return out


def _resample_axis(mask: np.ndarray, axis: int, size: int) -> np.ndarray:
    n = mask.shape[axis]
    if n == size:
        return mask
    # Output cell j covers the input interval [j * n / size, (j + 1) * n / size); for integer ratios
    # that is a block of n / size cells (an or over blocks) or one cell repeated (a repeat).
    if n % size == 0:
        return _or_blocks(mask, axis, n // size)
    if size % n == 0:
        return mask.repeat(size // n, axis=axis)
    starts = (np.arange(size) * n) // size
    ends = np.maximum(((np.arange(size) + 1) * n + size - 1) // size, starts + 1)
    cum = np.cumsum(np.moveaxis(mask, axis, -1).astype(np.int32), axis=-1)
    cum = np.concatenate([np.zeros(cum.shape[:-1] + (1,), np.int32), cum], axis=-1)
    counts = cum[..., ends] - cum[..., starts]
    return np.moveaxis(counts > 0, -1, axis)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation of a ``[B, H, W]`` mask by ``radius`` pixels."""
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return _window_any(mask, (k, k), (1, 1), (radius, radius, radius, radius), (1, 1), mask.shape[1:])


def run_instructions(instructions: Sequence[Mapping[str, Any]], pixel_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Execute mask instructions on a ``[B, H, W]`` boolean pixel mask; return every named mask."""
    masks: dict[str, np.ndarray] = {"input": pixel_mask.astype(bool, copy=False)}
    batch = pixel_mask.shape[0]
    for ins in instructions:
        op = ins["op"]
        if op == "empty":
            result = np.zeros((batch, *ins["size"]), dtype=bool)
        elif op == "window":
            result = _window_any(masks[ins["src"]], ins["kernel"], ins["stride"], ins["pads"],
                                 ins.get("dilation", (1, 1)), ins["size"])
        elif op == "transpose_window":
            result = _transpose_window_any(masks[ins["src"]], ins["kernel"], ins["stride"], ins["pads"], ins["size"])
        elif op == "upsample":
            fy, fx = ins["factor"]
            result = masks[ins["src"]].repeat(fy, axis=1).repeat(fx, axis=2)[:, :ins["size"][0], :ins["size"][1]]
        elif op == "dilate":
            result = dilate(masks[ins["src"]], int(ins["radius"]))
        elif op == "resample":
            result = _resample_axis(_resample_axis(masks[ins["src"]], 1, ins["size"][0]), 2, ins["size"][1])
        elif op == "union":
            srcs = [masks[s] for s in ins["srcs"]]
            result = np.logical_or.reduce(srcs) if srcs else None
        else:
            raise ValueError(f"unknown mask instruction {op!r}")
        masks[ins["out"]] = result
    return masks


def normalize_mask(mask: Any, input_size: Sequence[int], batch: int) -> np.ndarray:
    """A user mask as a C-contiguous boolean ``[B, H, W]`` array (``[H, W]`` is shared by the batch).

    Accepts booleans or integers 0/1; anything else raises ``InputError`` naming the problem.
    """

    h, w = (int(v) for v in input_size)
    try:
        m = np.asarray(mask)
    except Exception as exc:
        raise InputError(f"mask is not an array: {exc}") from exc
    if m.dtype != bool:
        if m.dtype.kind in "iu" and m.size and np.isin(m, (0, 1)).all():
            m = m.astype(bool)
        elif m.dtype.kind in "iu":
            raise InputError(f"mask must be boolean (or integers 0/1), got dtype {m.dtype} with other values")
        else:
            raise InputError(f"mask must be a boolean array, got dtype {m.dtype}")
    if m.shape == (h, w):
        m = np.broadcast_to(m, (batch, h, w))
    elif m.shape != (batch, h, w):
        raise InputError(f"mask has shape {list(m.shape)}, expected [{h}, {w}] or [{batch}, {h}, {w}] "
                         f"(the size of the spatial input)")
    return np.asarray(m, order="C")


def tile_index(mask: np.ndarray, tile: int, shared_batch: bool = False) -> TileIndex:
    """Reduce a ``[B, H, W]`` mask to the active tiles of a grid with tile size ``tile``.

    ``coords`` lists the active tiles in row-major order (batch, tile row, tile column); ``grid``
    holds each tile's position in ``coords`` or -1. With ``shared_batch`` every batch item gets the
    union of the items' tiles (so each item has the same number of tiles, in the same order).
    """
    b, h, w = mask.shape
    gh, gw = -(-h // tile), -(-w // tile)
    if (gh * tile, gw * tile) != (h, w):
        padded = np.zeros((b, gh * tile, gw * tile), dtype=bool)
        padded[:, :h, :w] = mask
        mask = padded
    cells = _or_blocks(_or_blocks(mask, 1, tile), 2, tile)
    if shared_batch:
        cells = np.broadcast_to(cells.any(axis=0, keepdims=True), cells.shape)
    coords = np.stack(np.nonzero(cells), axis=1).astype(np.int64, copy=False)
    grid = np.full((b, gh, gw), -1, dtype=np.int64)
    grid[cells] = np.arange(coords.shape[0], dtype=np.int64)
    return TileIndex(coords=coords.reshape(-1, 3), grid=grid)


def run_mask_program(program: Mapping[str, Any], resolutions: Sequence[Mapping[str, Any]],
                     pixel_mask: np.ndarray) -> dict[str, TileIndex]:
    """Tile indices of every resolution (by resolution name) for a ``[B, H, W]`` pixel mask."""
    masks = run_instructions(program["instructions"], pixel_mask)
    return {res["name"]: tile_index(masks[res["mask"]], int(res["tile"]), bool(res.get("shared_batch")))
            for res in resolutions}


def dilate_for_run(program: Mapping[str, Any], pixel_mask: np.ndarray, dilation: int | None = None) -> np.ndarray:
    """The pixel mask a run uses: dilated by ``dilation`` pixels (default: the mask program's)."""
    radius = int(program["dilation"] if dilation is None else dilation)
    return dilate(pixel_mask, radius) if radius > 0 else pixel_mask


def tiles_for_mask(manifest: Mapping[str, Any], pixel_mask: np.ndarray, dilation: int | None = None) -> dict[str, TileIndex]:
    """Active tiles per resolution for a normalised ``[B, H, W]`` pixel mask, dilated first as
    ``Engine.run`` does (:func:`dilate_for_run`)."""
    program = manifest["mask_program"]
    return run_mask_program(program, manifest["resolutions"], dilate_for_run(program, pixel_mask, dilation))
