"""Numpy helpers on tile-structured data used by the runtime (cache updates and their undo log).

Tile ``(b, ty, tx)`` of a map ``[B, C, H, W]`` with tile size T covers rows ``ty*T .. ty*T+T-1``
and columns ``tx*T .. tx*T+T-1``; the grid has ``ceil(H/T) x ceil(W/T)`` tiles. When H or W is not
a multiple of T, the last row or column of tiles crosses the bottom or right border: only its
part inside the map exists. ``split_tiles`` is the one rule both directions use to tell these
border tiles from the full inner ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BorderTile:
    """A tile clipped by the map's border: ``index`` into the coords, and the ``rows`` x ``cols`` part
    of batch item ``batch`` inside the map (the tile's top-left ``rows.stop - rows.start`` by
    ``cols.stop - cols.start`` pixels)."""

    index: int
    batch: int
    rows: slice
    cols: slice

    @property
    def height(self) -> int:
        """Rows of the tile inside the map."""
        return self.rows.stop - self.rows.start

    @property
    def width(self) -> int:
        """Columns of the tile inside the map."""
        return self.cols.stop - self.cols.start


@dataclass(frozen=True)
class TileSplit:
    """``coords`` split into tiles wholly inside the map and tiles clipped by its border."""

    inner: np.ndarray  # bool [N]: the tile lies wholly inside the map
    border: list[BorderTile]  # the others, in coords order
    full_rows: int  # tile rows that lie wholly inside the map: H // T
    full_cols: int  # tile columns that lie wholly inside the map: W // T


def tile_grid(shape: tuple[int, ...], tile: int) -> tuple[int, int, int]:
    """(B, tile rows, tile columns) of the grid over a map of ``shape`` [B, C, H, W] (border tiles included)."""
    batch, _, height, width = shape
    return batch, -(-height // tile), -(-width // tile)


def split_tiles(coords: np.ndarray, tile: int, shape: tuple[int, ...]) -> TileSplit:
    """Split ``coords`` [N, 3] (b, ty, tx) on a map of ``shape`` [B, C, H, W] into inner and border tiles.

    A tile is inner when it lies wholly inside the map (``ty < H // T`` and ``tx < W // T``);
    every other tile of the grid is a border tile, clipped to ``min(T, H - ty*T)`` rows and
    ``min(T, W - tx*T)`` columns. Coordinates outside the grid raise ``ValueError``.
    """
    height, width = shape[2], shape[3]
    coords = np.asarray(coords).reshape(-1, 3)
    grid = tile_grid(shape, tile)
    if coords.size and ((coords < 0).any() or (coords >= np.asarray(grid)).any()):
        raise ValueError(f"tile coordinates fall outside the tile grid {list(grid)} of a map {list(shape)} "
                         f"with tile size {tile}")
    full_rows, full_cols = height // tile, width // tile
    inner = (coords[:, 1] < full_rows) & (coords[:, 2] < full_cols)
    border = []
    for n in np.nonzero(~inner)[0]:
        b, ty, tx = (int(v) for v in coords[n])
        y0, x0 = ty * tile, tx * tile
        border.append(BorderTile(int(n), b, slice(y0, min(y0 + tile, height)), slice(x0, min(x0 + tile, width))))
    return TileSplit(inner, border, full_rows, full_cols)


def _inner_view(base: np.ndarray, split: TileSplit, tile: int) -> np.ndarray:
    """The inner tiles of ``base`` [B, C, H, W] as a [B, C, rows, T, cols, T] view (no copy for a strided array)."""
    batch, channels = base.shape[:2]
    cropped = base[:, :, :split.full_rows * tile, :split.full_cols * tile]
    return cropped.reshape(batch, channels, split.full_rows, tile, split.full_cols, tile)


def gather_tiles(base: np.ndarray, coords: np.ndarray, tile: int) -> np.ndarray:
    """The tiles of ``base`` [B, C, H, W] at ``coords`` [N, 3] as a new [N, C, T, T] array (zero past the border).

    The inverse of ``scatter_tiles_inplace``: scattering the result back leaves ``base`` unchanged.
    """
    coords = np.asarray(coords).reshape(-1, 3)
    split = split_tiles(coords, tile, base.shape)
    out = np.zeros((coords.shape[0], base.shape[1], tile, tile), base.dtype)
    if split.inner.any():
        c = coords[split.inner]
        out[split.inner] = _inner_view(base, split, tile)[c[:, 0], :, c[:, 1], :, c[:, 2], :]
    for t in split.border:
        out[t.index, :, :t.height, :t.width] = base[t.batch, :, t.rows, t.cols]
    return out


def scatter_tiles_inplace(base: np.ndarray, vals: np.ndarray, coords: np.ndarray) -> None:
    """Write tiles ``vals`` [N, C, T, T] at ``coords`` [N, 3] into ``base`` [B, C, H, W] in place.

    Inner tiles are written with one vectorised assignment; border tiles (``split_tiles``) are
    cropped to their part inside the map and written one by one.
    """
    if coords.shape[0] == 0:
        return
    tile = vals.shape[2]
    split = split_tiles(coords, tile, base.shape)
    if split.inner.any():
        view = _inner_view(base, split, tile)
        # reshape copies instead of viewing when it must; a write into a copy would be lost
        if not np.may_share_memory(view, base):
            raise AssertionError("cache array must be C-contiguous to be updated in place")
        c = coords[split.inner]
        view[c[:, 0], :, c[:, 1], :, c[:, 2], :] = vals[split.inner]
    for t in split.border:
        base[t.batch, :, t.rows, t.cols] = vals[t.index, :, :t.height, :t.width]
