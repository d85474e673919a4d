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

:func:`run_instructions` and :func:`tile_index` compute these on whole ``[B, H, W]`` masks: they
are the definition. :func:`run_mask_program` (what a run calls) and :func:`dilate` give the same
results, bit for bit, in time proportional to the edit rather than the image: every mask is carried
as the box of rows and columns outside which it is false (the bounding box of the pixel mask's true
pixels, grown and mapped by each instruction), and each instruction reads only the part of its
source's box (plus the margin its window, dilation or resampling reaches) that can make its result
true.
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


def _dilate_full(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    k = 2 * radius + 1
    return _window_any(mask, (k, k), (1, 1), (radius, radius, radius, radius), (1, 1), mask.shape[1:])


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square dilation of a ``[B, H, W]`` mask by ``radius`` pixels (computed on the box of its true
    pixels; a new array unless ``radius <= 0``)."""
    if radius <= 0:
        return mask
    return _Crop.of(mask).dilate(radius).full()


def run_instructions(instructions: Sequence[Mapping[str, Any]], pixel_mask: np.ndarray) -> dict[str, np.ndarray]:
    """Execute mask instructions on a ``[B, H, W]`` boolean pixel mask; return every named mask.

    Whole-image computation: the definition :func:`run_mask_program` reproduces on boxes."""
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
            result = _dilate_full(masks[ins["src"]], int(ins["radius"]))
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
    """Tile indices of every resolution (by resolution name) for a ``[B, H, W]`` pixel mask.

    Equal to ``tile_index(run_instructions(...)[res["mask"]], ...)`` for every resolution, computed
    on the box of the mask's true pixels (its cost follows the edit, not the image)."""
    masks = _run_cropped(program["instructions"], pixel_mask)
    return {res["name"]: masks[res["mask"]].tile_index(int(res["tile"]), bool(res.get("shared_batch")))
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


# ----- the same on boxes -------------------------------------------------------------------------

def _any_blocks(mask: np.ndarray, axis: int, block: int) -> np.ndarray:
    """``_or_blocks`` in fewer numpy calls (what counts on the small arrays of a box): a reduction
    over a reshape across rows; along the last axis, blocks of 2, 4 or 8 cells read as one integer
    each (bool is one byte: a block is true when its word is nonzero)."""
    if axis != mask.ndim - 1:
        shape = mask.shape[:axis] + (mask.shape[axis] // block, block) + mask.shape[axis + 1:]
        return np.logical_or.reduce(mask.reshape(shape), axis=axis + 1)
    for word in (8, 4, 2):
        if block % word == 0:
            words = np.ascontiguousarray(mask).view(f"u{word}")
            return (_or_blocks(words, axis, block // word) if block > word else words) != 0
    return _or_blocks(mask, axis, block)


def _span(lo: int, hi: int, size: int) -> tuple[int, int]:
    """``[lo, hi)`` clipped to ``[0, size)``; an empty span is ``(0, 0)``."""
    lo, hi = max(lo, 0), min(hi, size)
    return (lo, hi) if lo < hi else (0, 0)


@dataclass(frozen=True)
class _Crop:
    """A ``[B, *size]`` boolean mask that is false outside rows ``ys`` and columns ``xs`` (half-open
    spans); ``data`` [B, ys[1] - ys[0], xs[1] - xs[0]] holds the box. An all-false mask has empty spans."""

    data: np.ndarray
    ys: tuple[int, int]
    xs: tuple[int, int]
    size: tuple[int, int]

    @staticmethod
    def of(mask: np.ndarray) -> "_Crop":
        """The box of the true pixels of a whole ``[B, H, W]`` mask."""
        b, h, w = mask.shape
        rows = np.flatnonzero(mask.any(axis=(0, 2)))
        if rows.size == 0:
            return _Crop.empty(b, (h, w))
        ys = (int(rows[0]), int(rows[-1]) + 1)
        cols = np.flatnonzero(mask[:, ys[0]:ys[1]].any(axis=(0, 1)))
        xs = (int(cols[0]), int(cols[-1]) + 1)
        return _Crop(mask[:, ys[0]:ys[1], xs[0]:xs[1]], ys, xs, (h, w))

    @staticmethod
    def empty(batch: int, size: Sequence[int]) -> "_Crop":
        return _Crop(np.zeros((batch, 0, 0), bool), (0, 0), (0, 0), (int(size[0]), int(size[1])))

    @property
    def is_empty(self) -> bool:
        return self.ys[0] == self.ys[1] or self.xs[0] == self.xs[1]

    def read(self, ys: tuple[int, int], xs: tuple[int, int]) -> np.ndarray:
        """The mask over rows ``ys`` and columns ``xs`` (any integers: false outside the box, also
        outside the image)."""
        out = np.zeros((self.data.shape[0], ys[1] - ys[0], xs[1] - xs[0]), bool)
        y0, y1 = max(ys[0], self.ys[0]), min(ys[1], self.ys[1])
        x0, x1 = max(xs[0], self.xs[0]), min(xs[1], self.xs[1])
        if y0 < y1 and x0 < x1:
            out[:, y0 - ys[0]:y1 - ys[0], x0 - xs[0]:x1 - xs[0]] = \
                self.data[:, y0 - self.ys[0]:y1 - self.ys[0], x0 - self.xs[0]:x1 - self.xs[0]]
        return out

    def full(self) -> np.ndarray:
        """The whole ``[B, H, W]`` mask."""
        return self.read((0, self.size[0]), (0, self.size[1]))

    def window(self, kernel: Sequence[int], stride: Sequence[int], pads: Sequence[int], dilation: Sequence[int],
               size: Sequence[int]) -> "_Crop":
        """``_window_any``: output ``y`` reads input rows ``y * s + k * d - p``, ``k < kernel``."""
        batch = self.data.shape[0]
        if self.is_empty:
            return _Crop.empty(batch, size)
        spans, reads = [], []
        for (lo, hi), k, s, p, d, n in zip((self.ys, self.xs), kernel, stride, pads[:2], dilation, size):
            out = _span(-(-(lo + p - (k - 1) * d) // s), (hi - 1 + p) // s + 1, n)
            if out == (0, 0):
                return _Crop.empty(batch, size)
            spans.append(out)
            reads.append((out[0] * s - p, (out[1] - 1) * s - p + (k - 1) * d + 1))
        # The box read holds exactly the taps of the output box: slide without padding.
        local = self.read(*reads)
        for axis, ((lo, hi), k, s, d) in enumerate(zip(spans, kernel, stride, dilation), start=1):
            taps = [local[(slice(None),) * axis + (slice(t * d, t * d + (hi - lo - 1) * s + 1, s),)] for t in range(k)]
            local = taps[0].copy()
            for tap in taps[1:]:
                local |= tap
        return _Crop(local, spans[0], spans[1], (int(size[0]), int(size[1])))

    def dilate(self, radius: int) -> "_Crop":
        if radius <= 0:
            return self
        k = 2 * radius + 1
        return self.window((k, k), (1, 1), (radius, radius), (1, 1), self.size)

    def transpose_window(self, kernel: Sequence[int], stride: Sequence[int], pads: Sequence[int],
                         size: Sequence[int]) -> "_Crop":
        """``_transpose_window_any``: input ``i`` reaches outputs ``i * s - p + k``, ``k < kernel``."""
        batch = self.data.shape[0]
        if self.is_empty:
            return _Crop.empty(batch, size)
        spans, local_pads = [], []
        for (lo, hi), k, s, p, n in zip((self.ys, self.xs), kernel, stride, pads[:2], size):
            out = _span(lo * s - p, (hi - 1) * s - p + k, n)
            if out == (0, 0):
                return _Crop.empty(batch, size)
            spans.append(out)
            local_pads.append(p - lo * s + out[0])  # output o of the box is o + out[0] of the map
        out_size = (spans[0][1] - spans[0][0], spans[1][1] - spans[1][0])
        data = _transpose_window_any(self.data, kernel, stride, local_pads, out_size)
        return _Crop(data, spans[0], spans[1], (int(size[0]), int(size[1])))

    def upsample(self, factor: Sequence[int], size: Sequence[int]) -> "_Crop":
        """Nearest repetition by ``factor``, cut to ``size`` (never grown: as ``run_instructions``)."""
        full = tuple(min(n * f, int(m)) for n, f, m in zip(self.size, factor, size))
        spans = [_span(lo * f, hi * f, n) for (lo, hi), f, n in zip((self.ys, self.xs), factor, full)]
        if self.is_empty or (0, 0) in spans:
            return _Crop.empty(self.data.shape[0], full)
        data = self.data.repeat(factor[0], axis=1).repeat(factor[1], axis=2)
        return _Crop(data[:, :spans[0][1] - spans[0][0], :spans[1][1] - spans[1][0]], spans[0], spans[1], full)

    def resample(self, size: Sequence[int]) -> "_Crop":
        """``_resample_axis`` along rows, then columns."""
        crop = self
        for axis, n_out in ((1, int(size[0])), (2, int(size[1]))):
            crop = crop._resample_axis(axis, n_out)
        return crop

    def _resample_axis(self, axis: int, size: int) -> "_Crop":
        n = self.size[axis - 1]
        new_size = (size, self.size[1]) if axis == 1 else (self.size[0], size)
        if n == size:
            return self
        if self.is_empty:
            return _Crop.empty(self.data.shape[0], new_size)
        lo, hi = self.ys if axis == 1 else self.xs
        # Output cell j reads the input interval [starts[j], ends[j]) (both nondecreasing in j):
        # the cells whose interval meets the box [lo, hi), and the inputs those cells read.
        if n % size == 0:
            block = n // size
            out = (lo // block, (hi - 1) // block + 1)
            reads = (out[0] * block, out[1] * block)
        elif size % n == 0:
            out = (lo * (size // n), hi * (size // n))
            reads = (lo, hi)
        else:
            j = np.arange(size)
            starts = (j * n) // size
            ends = np.maximum(((j + 1) * n + size - 1) // size, starts + 1)
            out = (int(np.searchsorted(ends, lo, side="right")), int(np.searchsorted(starts, hi, side="left")))
            reads = (int(starts[out[0]]), int(ends[out[1] - 1]))
        rows, cols = (reads, self.xs) if axis == 1 else (self.ys, reads)
        local = self.read(rows, cols)
        if n % size == 0:
            data = _any_blocks(local, axis, n // size)
        elif size % n == 0:
            data = local.repeat(size // n, axis=axis)
        else:
            starts, ends = starts[out[0]:out[1]] - reads[0], ends[out[0]:out[1]] - reads[0]
            cum = np.cumsum(np.moveaxis(local, axis, -1).astype(np.int32), axis=-1)
            cum = np.concatenate([np.zeros(cum.shape[:-1] + (1,), np.int32), cum], axis=-1)
            data = np.moveaxis(cum[..., ends] - cum[..., starts] > 0, -1, axis)
        if axis == 1:
            return _Crop(data, out, self.xs, new_size)
        return _Crop(data, self.ys, out, new_size)

    @staticmethod
    def union(crops: Sequence["_Crop"]) -> "_Crop":
        live = [c for c in crops if not c.is_empty]
        if not live:
            return crops[0]
        ys = (min(c.ys[0] for c in live), max(c.ys[1] for c in live))
        xs = (min(c.xs[0] for c in live), max(c.xs[1] for c in live))
        data = live[0].read(ys, xs)
        for c in live[1:]:
            data[:, c.ys[0] - ys[0]:c.ys[1] - ys[0], c.xs[0] - xs[0]:c.xs[1] - xs[0]] |= c.data
        return _Crop(data, ys, xs, crops[0].size)

    def tile_index(self, tile: int, shared_batch: bool = False) -> TileIndex:
        """``tile_index`` of the whole mask: the tiles meeting the box, the rest of the grid -1."""
        b = self.data.shape[0]
        gh, gw = -(-self.size[0] // tile), -(-self.size[1] // tile)
        grid = np.full((b, gh, gw), -1, dtype=np.int64)
        if self.is_empty:
            return TileIndex(coords=np.zeros((0, 3), np.int64), grid=grid)
        ty, tx = ((lo // tile, -(-hi // tile)) for lo, hi in (self.ys, self.xs))
        local = self.read((ty[0] * tile, ty[1] * tile), (tx[0] * tile, tx[1] * tile))
        cells = _any_blocks(_any_blocks(local, 1, tile), 2, tile)
        if shared_batch:
            cells = np.broadcast_to(cells.any(axis=0, keepdims=True), cells.shape)
        bi, yi, xi = np.nonzero(cells)
        coords = np.stack([bi, yi + ty[0], xi + tx[0]], axis=1).astype(np.int64, copy=False)
        grid[:, ty[0]:ty[1], tx[0]:tx[1]][cells] = np.arange(coords.shape[0], dtype=np.int64)
        return TileIndex(coords=coords.reshape(-1, 3), grid=grid)


def _run_cropped(instructions: Sequence[Mapping[str, Any]], pixel_mask: np.ndarray) -> dict[str, _Crop]:
    """``run_instructions`` on boxes."""
    masks: dict[str, _Crop] = {"input": _Crop.of(pixel_mask.astype(bool, copy=False))}
    batch = pixel_mask.shape[0]
    for ins in instructions:
        op = ins["op"]
        if op == "empty":
            result = _Crop.empty(batch, ins["size"])
        elif op == "window":
            result = masks[ins["src"]].window(ins["kernel"], ins["stride"], ins["pads"], ins.get("dilation", (1, 1)),
                                              ins["size"])
        elif op == "transpose_window":
            result = masks[ins["src"]].transpose_window(ins["kernel"], ins["stride"], ins["pads"], ins["size"])
        elif op == "upsample":
            result = masks[ins["src"]].upsample(ins["factor"], ins["size"])
        elif op == "dilate":
            result = masks[ins["src"]].dilate(int(ins["radius"]))
        elif op == "resample":
            result = masks[ins["src"]].resample(ins["size"])
        elif op == "union":
            srcs = [masks[s] for s in ins["srcs"]]
            result = _Crop.union(srcs) if srcs else None
        else:
            raise ValueError(f"unknown mask instruction {op!r}")
        masks[ins["out"]] = result
    return masks
