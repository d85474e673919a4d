"""Names of the SPARSE graph's engine-fed inputs: caches of the original activations and tile indices.

- ``cache::<source>``: the original model's tensor ``source`` as computed by the FULL graph, which
  outputs it under the name ``<source>``;
- ``tiles::coords::<res>`` ``[N, 3]`` int64 and ``tiles::grid::<res>`` ``[B, gh, gw]`` int64: the
  active tiles of resolution ``<res>`` (``r<H>x<W>``), see docs/ops.md.
"""

from __future__ import annotations

import re

CACHE_PREFIX = "cache::"
COORDS_PREFIX = "tiles::coords::"
GRID_PREFIX = "tiles::grid::"
_TILE_INPUT = re.compile(r"^tiles::(?:coords|grid)::(r\d+x\d+)$")


def cache_input(source: str) -> str:
    """The SPARSE-graph input that receives the cached original value of ``source``."""
    return CACHE_PREFIX + source


def cache_source(name: str) -> str:
    """Inverse of :func:`cache_input` (the FULL-graph output name)."""
    if not name.startswith(CACHE_PREFIX):
        raise ValueError(f"{name!r} is not a cache input")
    return name[len(CACHE_PREFIX):]


def is_cache_input(name: str) -> bool:
    """True for ``cache::...`` names."""
    return name.startswith(CACHE_PREFIX)


def coords_input(resolution: str) -> str:
    """The tile-coordinate input of ``resolution`` (e.g. ``r64x64``)."""
    return COORDS_PREFIX + resolution


def grid_input(resolution: str) -> str:
    """The tile-grid input of ``resolution``."""
    return GRID_PREFIX + resolution


def tile_input_resolution(name: str) -> str | None:
    """The resolution named by a ``tiles::coords::`` / ``tiles::grid::`` input, else None."""
    m = _TILE_INPUT.match(name)
    return m.group(1) if m else None
