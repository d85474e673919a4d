"""The production engine: prime caches with the original inputs, then run edits sparsely.

Threading contract: ``prime``, ``run`` and ``run_dense`` may be called from many threads at once.
Runs on the same key read its caches under a shared lock; ``prime`` and the write phase of
``run(update_cache=True)`` take that key's exclusive lock, so a concurrent run sees the caches
either entirely before or entirely after an update. The backends' sessions are thread-safe.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from sigec.errors import CacheError, InputError
from sigec.runtime import costs
from sigec.runtime.mask_program import TileIndex, run_instructions, run_mask_program
from sigec.runtime.tiles import scatter_tiles_inplace

DEFAULT_KEY = "default"


class _ReadWriteLock:
    """Many readers or one writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


@dataclass
class CacheEntry:
    """Everything primed for one key: the original inputs and outputs and the FULL graph's caches."""

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]
    tensors: dict[str, np.ndarray]
    lock: _ReadWriteLock = field(default_factory=_ReadWriteLock)

    @property
    def nbytes(self) -> int:
        """Bytes held by this entry."""
        return sum(a.nbytes for a in self.tensors.values()) + sum(a.nbytes for a in self.inputs.values()) + \
            sum(a.nbytes for a in self.outputs)


@dataclass
class RunStats:
    """What the last ``run`` did."""

    path: str
    wall_ms: float
    active_fraction: dict[str, float]
    active_tiles: dict[str, int]
    dense_macs: int
    executed_macs: int

    @property
    def mac_reduction(self) -> float:
        """Dense MACs over executed MACs."""
        return self.dense_macs / max(self.executed_macs, 1)


class Engine:
    """A loaded sigec engine (see ``sigec.load``)."""

    def __init__(self, manifest: Mapping[str, Any], runners: Mapping[str, Any], *, path: str = "",
                 dense_fallback_fraction: float | None = None) -> None:
        self.manifest = dict(manifest)
        self.path = path
        self._runners = runners
        self._inputs = list(self.manifest["inputs"])
        self._outputs = [o["name"] for o in self.manifest["outputs"]]
        self._spatial = [i["name"] for i in self._inputs if i["spatial"]]
        self._caches: dict[Hashable, CacheEntry] = {}
        self._caches_lock = threading.Lock()
        options = self.manifest.get("options", {})
        # Fall back to the dense graph when the sparse run would execute at least this fraction of
        # the dense MACs (the sparse path's overheads make it slower beyond that point).
        self.dense_fallback_fraction = float(dense_fallback_fraction if dense_fallback_fraction is not None
                                             else options.get("dense_fallback_fraction", 0.6))
        self._local = threading.local()
        self._nodes = list(self.manifest.get("nodes", []))

    # ----- public surface ---------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        """Model input names, in order."""
        return [i["name"] for i in self._inputs]

    @property
    def output_names(self) -> list[str]:
        """Model output names, in order."""
        return list(self._outputs)

    @property
    def stats(self) -> RunStats | None:
        """Statistics of the last ``run`` made by this thread."""
        return getattr(self._local, "stats", None)

    def cache_keys(self) -> list[Hashable]:
        """Keys that have been primed."""
        with self._caches_lock:
            return list(self._caches)

    def cache_bytes(self, key: Hashable | None = None) -> int:
        """Bytes held by the cache of ``key`` (all keys when None)."""
        with self._caches_lock:
            if key is None:
                return sum(e.nbytes for e in self._caches.values())
            return self._entry(key).nbytes

    def drop(self, key: Hashable | None = None) -> None:
        """Forget the cache of ``key``."""
        with self._caches_lock:
            self._caches.pop(DEFAULT_KEY if key is None else key, None)

    def prime(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, key: Hashable | None = None) -> list[np.ndarray]:
        """Run the FULL graph on the original inputs and keep its caches under ``key``; return the outputs."""
        feeds = self._validate_inputs(inputs)
        cache_sources = sorted({c["source"] for c in self.manifest["caches"]})
        names = self._outputs + [s for s in cache_sources if s not in self._outputs]
        results = dict(zip(names, self._runners["full"].run(feeds, names)))
        tensors = {c["name"]: np.asarray(results[c["source"]], order="C") for c in self.manifest["caches"]}
        outputs = [results[n] for n in self._outputs]
        entry = CacheEntry(inputs={k: v.copy() for k, v in feeds.items()}, outputs=outputs, tensors=tensors)
        key = DEFAULT_KEY if key is None else key
        with self._caches_lock:
            old = self._caches.get(key)
        if old is not None:
            old.lock.acquire_write()
            try:
                with self._caches_lock:
                    self._caches[key] = entry
            finally:
                old.lock.release_write()
        else:
            with self._caches_lock:
                self._caches[key] = entry
        return [o.copy() for o in outputs]

    def run_dense(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the plain dense model."""
        feeds = self._validate_inputs(inputs)
        return self._runners["dense"].run(feeds, self._outputs)

    def run(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, mask: np.ndarray | None = None,
            key: Hashable | None = None, update_cache: bool = False, threshold: float | None = None,
            dilation: int | None = None) -> list[np.ndarray]:
        """Run the edited inputs incrementally against the cache of ``key``; return the outputs."""
        start = time.perf_counter()
        feeds = self._validate_inputs(inputs)
        entry = self._entry(DEFAULT_KEY if key is None else key)
        if update_cache:
            entry.lock.acquire_write()
        else:
            entry.lock.acquire_read()
        try:
            self._check_static_inputs(feeds, entry, key)
            pixel_mask = self._pixel_mask(feeds, entry, mask, threshold, dilation)
            if not pixel_mask.any():
                self._record("empty", start, {}, 0)
                if update_cache:
                    entry.inputs = {k: v.copy() for k, v in feeds.items()}
                return [o.copy() for o in entry.outputs]
            tiles = run_mask_program(self.manifest["mask_program"], self.manifest["resolutions"], pixel_mask)
            if self._executed_macs(tiles) >= self.dense_fallback_fraction * max(self._dense_macs(), 1):
                return self._run_dense_path(feeds, entry, update_cache, start, tiles)
            outputs, updates = self._run_sparse(feeds, entry, tiles, update_cache)
            if update_cache:
                self._apply_updates(entry, updates, tiles, feeds, outputs)
            self._record("sparse", start, tiles, self._executed_macs(tiles))
            return outputs
        finally:
            if update_cache:
                entry.lock.release_write()
            else:
                entry.lock.release_read()

    def expected_macs(self, mask: np.ndarray) -> tuple[int, int, dict[str, TileIndex]]:
        """(dense MACs, executed MACs, tile indices) for a pixel mask, without running anything."""
        pixel_mask = self._normalize_mask(mask)
        tiles = run_mask_program(self.manifest["mask_program"], self.manifest["resolutions"], pixel_mask)
        return self._dense_macs(), self._executed_macs(tiles), tiles

    # ----- internals --------------------------------------------------------------------------
    def _entry(self, key: Hashable) -> CacheEntry:
        with self._caches_lock:
            entry = self._caches.get(key)
        if entry is None:
            if not self._caches:
                raise CacheError("run() before prime(): prime the engine with the original inputs first")
            raise CacheError(f"unknown cache key {key!r}; primed keys: {list(self._caches)[:10]}")
        return entry

    def _validate_inputs(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        specs = {i["name"]: i for i in self._inputs}
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in specs]
            if unknown:
                raise InputError(f"unknown input name(s) {unknown}; the engine's inputs are {list(specs)}")
            missing = [k for k in specs if k not in inputs]
            if missing:
                raise InputError(f"missing input(s) {missing}")
            items = dict(inputs)
        else:
            seq = list(inputs) if not isinstance(inputs, np.ndarray) else [inputs]
            if len(seq) != len(specs):
                raise InputError(f"expected {len(specs)} inputs ({list(specs)}), got {len(seq)}")
            items = dict(zip(specs, seq))
        feeds = {}
        for name, value in items.items():
            spec = specs[name]
            try:
                array = np.asarray(value)
            except Exception as exc:
                raise InputError(f"input '{name}' is not an array: {exc}") from exc
            want = np.dtype(spec["dtype"])
            if array.dtype != want:
                if array.dtype.kind in "fiu" and want.kind in "fiu" and np.can_cast(array.dtype, want, "same_kind"):
                    array = array.astype(want)
                else:
                    raise InputError(f"input '{name}' has dtype {array.dtype}, expected {want}")
            if list(array.shape) != list(spec["shape"]):
                raise InputError(f"input '{name}' has shape {list(array.shape)}, expected {spec['shape']}")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise InputError(f"input '{name}' contains NaN or Inf values (sigec refuses non-finite inputs)")
            feeds[name] = np.asarray(array, order="C")
        return feeds

    def _check_static_inputs(self, feeds: Mapping[str, np.ndarray], entry: CacheEntry, key: Hashable | None) -> None:
        for name, value in feeds.items():
            if name not in self._spatial and not np.array_equal(value, entry.inputs[name]):
                raise InputError(f"input '{name}' differs from the value primed for key {key!r}; non-spatial inputs "
                                 f"(e.g. a timestep) select the cache: prime a key with this value")

    def _normalize_mask(self, mask: np.ndarray) -> np.ndarray:
        h, w = self.manifest["mask_program"]["input_size"]
        batch = int(self.manifest.get("batch", 1))
        m = np.asarray(mask)
        if m.dtype != bool:
            if m.dtype.kind in "iu" and set(np.unique(m).tolist()) <= {0, 1}:
                m = m.astype(bool)
            else:
                raise InputError(f"mask must be a boolean array, got dtype {m.dtype}")
        if m.shape == (h, w):
            m = np.broadcast_to(m, (batch, h, w))
        elif m.shape != (batch, h, w):
            raise InputError(f"mask has shape {list(m.shape)}, expected [{h}, {w}] or [{batch}, {h}, {w}] "
                             f"(the size of the spatial input)")
        return np.asarray(m, order="C")

    def _pixel_mask(self, feeds: Mapping[str, np.ndarray], entry: CacheEntry, mask: np.ndarray | None,
                    threshold: float | None, dilation: int | None) -> np.ndarray:
        program = self.manifest["mask_program"]
        if mask is not None:
            pixel = self._normalize_mask(mask)
        else:
            thr = float(program["threshold"] if threshold is None else threshold)
            pixel = None
            for name in self._spatial:
                diff = np.abs(feeds[name] - entry.inputs[name]).max(axis=1) > thr
                pixel = diff if pixel is None else pixel | diff
        radius = int(program["dilation"] if dilation is None else dilation)
        if radius > 0:
            pixel = run_instructions([{"op": "dilate", "src": "input", "radius": radius, "out": "d"}], pixel)["d"]
        return pixel

    def _fractions(self, tiles: Mapping[str, TileIndex]) -> dict[str, float]:
        return {name: t.count / max(t.grid.size, 1) for name, t in tiles.items()}

    def _tile_feeds(self, tiles: Mapping[str, TileIndex]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, t in tiles.items():
            feeds[f"tiles::coords::{name}"] = t.coords
            feeds[f"tiles::grid::{name}"] = t.grid
        return feeds

    def _run_sparse(self, feeds: dict[str, np.ndarray], entry: CacheEntry, tiles: Mapping[str, TileIndex],
                    update_cache: bool) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        all_feeds = {**feeds, **entry.tensors, **self._tile_feeds(tiles)}
        update_names = [u["output"] for u in self.manifest["updates"]] if update_cache else []
        results = self._runners["sparse"].run(all_feeds, self._outputs + update_names)
        outputs = results[:len(self._outputs)]
        return outputs, dict(zip(update_names, results[len(self._outputs):]))

    def _apply_updates(self, entry: CacheEntry, updates: Mapping[str, np.ndarray], tiles: Mapping[str, TileIndex],
                       feeds: Mapping[str, np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        for u in self.manifest["updates"]:
            scatter_tiles_inplace(entry.tensors[u["cache"]], updates[u["output"]], tiles[u["resolution"]].coords)
        entry.inputs = {k: v.copy() for k, v in feeds.items()}
        entry.outputs = [o.copy() for o in outputs]

    def _run_dense_path(self, feeds: dict[str, np.ndarray], entry: CacheEntry, update_cache: bool, start: float,
                        tiles: Mapping[str, TileIndex]) -> list[np.ndarray]:
        if update_cache:
            cache_sources = sorted({c["source"] for c in self.manifest["caches"]})
            names = self._outputs + [s for s in cache_sources if s not in self._outputs]
            results = dict(zip(names, self._runners["full"].run(feeds, names)))
            outputs = [results[n] for n in self._outputs]
            for c in self.manifest["caches"]:
                np.copyto(entry.tensors[c["name"]], results[c["source"]])
            entry.inputs = {k: v.copy() for k, v in feeds.items()}
            entry.outputs = [o.copy() for o in outputs]
        else:
            outputs = self._runners["dense"].run(feeds, self._outputs)
        self._record("dense", start, tiles, self._dense_macs())
        return outputs

    def _dense_macs(self) -> int:
        return costs.dense_macs(self._nodes)

    def _executed_macs(self, tiles: Mapping[str, TileIndex]) -> int:
        return costs.executed_macs(self._nodes, tiles)

    def _record(self, path: str, start: float, tiles: Mapping[str, TileIndex], executed: int) -> None:
        self._local.stats = RunStats(path=path, wall_ms=(time.perf_counter() - start) * 1e3,
                                     active_fraction=self._fractions(tiles),
                                     active_tiles={k: t.count for k, t in tiles.items()},
                                     dense_macs=self._dense_macs(), executed_macs=executed)
