"""Numpy helpers on tile-structured data used by the runtime (cache updates)."""

from __future__ import annotations

import numpy as np


def scatter_tiles_inplace(base: np.ndarray, vals: np.ndarray, coords: np.ndarray) -> None:
    """Write tiles ``vals`` [N, C, T, T] at ``coords`` [N, 3] into ``base`` [B, C, H, W] in place.

    Tiles fully inside the map are written with one vectorised assignment; tiles on the right or
    bottom border (when H or W is not a multiple of T) are cropped and written one by one.
    """
    if coords.shape[0] == 0:
        return
    _, channels, height, width = base.shape
    tile = vals.shape[2]
    gh_full, gw_full = height // tile, width // tile
    inner = (coords[:, 1] < gh_full) & (coords[:, 2] < gw_full)
    if inner.any():
        view = base[:, :, :gh_full * tile, :gw_full * tile].reshape(base.shape[0], channels, gh_full, tile, gw_full, tile)
        c = coords[inner]
        if not np.shares_memory(view, base):
            raise AssertionError("cache array must be C-contiguous to be updated in place")
        view[c[:, 0], :, c[:, 1], :, c[:, 2], :] = vals[inner]
    for n in np.nonzero(~inner)[0]:
        b, ty, tx = (int(v) for v in coords[n])
        y0, x0 = ty * tile, tx * tile
        h, w = min(tile, height - y0), min(tile, width - x0)
        base[b, :, y0:y0 + h, x0:x0 + w] = vals[n, :, :h, :w]
