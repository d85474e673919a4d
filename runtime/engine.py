"""The production engine: prime caches with the original inputs, then run edits sparsely.

Threading contract
------------------
``prime``, ``run``, ``run_dense``, ``drop``, ``cache_keys`` and ``cache_bytes`` may be called from
many threads at once, on the same key or on different keys:

- Every cache entry (one per key) has a readers-writer lock. ``run`` without ``update_cache``
  holds it shared while it reads the entry; ``run(update_cache=True)`` holds it exclusively for the
  whole run (read, compute, write); ``prime`` on an existing key holds the old entry's lock
  exclusively while it swaps the new entry in. A run therefore sees a key's caches entirely before
  or entirely after any update or re-prime, never a mix. Waiting writers have priority over new
  readers, so a stream of runs cannot starve an update.
- Runs on different keys never wait for each other. The engine-wide dictionary of entries has its
  own short lock that is never held while waiting for an entry lock or running a graph.
- A run that acquired an entry which a concurrent ``prime`` replaced (or an eviction removed)
  meanwhile starts over on the current entry (or raises ``CacheError`` for an evicted key).
- ``engine.stats`` is thread-local: it describes the last ``run`` made by the calling thread.
- The backends' runners are called concurrently; ONNX Runtime sessions and the PyTorch reference
  executor are safe for concurrent ``run`` calls. Results do not depend on concurrency (with the
  ``ort`` backend they are bit-identical to sequential runs, tested with 1 intra-op thread).

Failures
--------
A failing call leaves every cache exactly as it was: ``prime`` installs its entry only after the
FULL graph succeeded; ``run(update_cache=True)`` validates everything and copies what it needs
before the first write, and undoes its writes if the write phase is interrupted (see
``_apply_updates``). Unexpected exceptions raised by a backend are re-raised as ``BackendError``.

Memory
------
``max_cache_bytes`` (constructor or ``sigec.load``) bounds the bytes held by all keys' entries
(caches, primed inputs and outputs; see ``cache_bytes``). When a ``prime`` would exceed it, the
least recently used keys (a key is used by ``prime`` and ``run``) are evicted until the new entry
fits; a single entry larger than the bound raises ``CacheError`` naming both sizes and changes
nothing. An evicted entry still used by a running call is freed when that call returns.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from sigec.core.errors import BackendError, CacheError, InputError, SigecError
from sigec.core.names import coords_input, grid_input
from sigec.core.options import DENSE_FALLBACK_FRACTION
from sigec.runtime import costs
from sigec.core.mask_program import TileIndex, dilate_for_run, normalize_mask, run_mask_program, tiles_for_mask
from sigec.runtime.tiles import scatter_tiles_inplace

DEFAULT_KEY = "default"
_EVICTED_MEMORY = 256  # how many evicted keys are remembered for clearer error messages


class _ReadWriteLock:
    """Many readers or one writer; waiting writers go before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
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


@dataclass
class _PreparedUpdate:
    """One validated tile update: where it goes, the new tiles and the tiles they overwrite."""

    cache: str
    vals: np.ndarray
    coords: np.ndarray
    undo: np.ndarray


def _format_bytes(n: int) -> str:
    return f"{n} bytes ({n / 2 ** 20:.2f} MiB)"


def _gather_tiles(base: np.ndarray, coords: np.ndarray, tile: int) -> np.ndarray:
    """The tiles of ``base`` [B, C, H, W] at ``coords`` [N, 3] as [N, C, T, T] (zero past the border).

    The inverse of ``scatter_tiles_inplace``: scattering the result back leaves ``base`` unchanged.
    """
    batch, channels, height, width = base.shape
    out = np.zeros((coords.shape[0], channels, tile, tile), base.dtype)
    gh_full, gw_full = height // tile, width // tile
    inner = (coords[:, 1] < gh_full) & (coords[:, 2] < gw_full)
    if inner.any():
        view = base[:, :, :gh_full * tile, :gw_full * tile].reshape(batch, channels, gh_full, tile, gw_full, tile)
        c = coords[inner]
        out[inner] = view[c[:, 0], :, c[:, 1], :, c[:, 2], :]
    for n in np.nonzero(~inner)[0]:
        b, ty, tx = (int(v) for v in coords[n])
        y0, x0 = ty * tile, tx * tile
        h, w = min(tile, height - y0), min(tile, width - x0)
        out[n, :, :h, :w] = base[b, :, y0:y0 + h, x0:x0 + w]
    return out


class Engine:
    """A loaded sigec engine (see ``sigec.load``)."""

    def __init__(self, manifest: Mapping[str, Any], runners: Mapping[str, Any], *, path: str = "",
                 dense_fallback_fraction: float | None = None, max_cache_bytes: int | None = None) -> None:
        self.manifest = dict(manifest)
        self.path = path
        self._runners = runners
        self._inputs = list(self.manifest["inputs"])
        self._outputs = [o["name"] for o in self.manifest["outputs"]]
        self._spatial = [i["name"] for i in self._inputs if i["spatial"]]
        # Entries by key, least recently used first; guarded by _caches_lock.
        self._caches: OrderedDict[Hashable, CacheEntry] = OrderedDict()
        self._evicted: OrderedDict[Hashable, None] = OrderedDict()
        self._caches_lock = threading.Lock()
        self._max_cache_bytes = self._check_max_bytes(max_cache_bytes)
        options = self.manifest.get("options", {})
        # Fall back to the dense graph when the sparse run would execute at least this fraction of
        # the dense MACs (the sparse path's overheads make it slower beyond that point).
        self.dense_fallback_fraction = float(dense_fallback_fraction if dense_fallback_fraction is not None
                                             else options.get("dense_fallback_fraction", DENSE_FALLBACK_FRACTION))
        self._local = threading.local()
        self._costs = costs.CostModel(self.manifest.get("nodes", []))

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

    @property
    def max_cache_bytes(self) -> int | None:
        """Bound on the bytes held by all keys' entries (None: unbounded); see the module docstring."""
        return self._max_cache_bytes

    @max_cache_bytes.setter
    def max_cache_bytes(self, value: int | None) -> None:
        """Change the bound; least recently used keys are evicted at once until the entries fit."""
        value = self._check_max_bytes(value)
        with self._caches_lock:
            self._max_cache_bytes = value
            self._evict_locked(keep=None)

    def cache_keys(self) -> list[Hashable]:
        """Keys that have been primed (and not dropped or evicted), least recently used first."""
        with self._caches_lock:
            return list(self._caches)

    def cache_bytes(self, key: Hashable | None = None) -> int:
        """Bytes held by the cache of ``key`` (all keys when None)."""
        with self._caches_lock:
            if key is None:
                return sum(e.nbytes for e in self._caches.values())
            return self._entry_locked(self._resolve_key(key)).nbytes

    def drop(self, key: Hashable | None = None) -> None:
        """Forget the cache of ``key`` (nothing happens for a key that is not primed)."""
        key = self._resolve_key(key)
        with self._caches_lock:
            self._caches.pop(key, None)

    def prime(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, key: Hashable | None = None) -> list[np.ndarray]:
        """Run the FULL graph on the original inputs and keep its caches under ``key``; return the outputs.

        Nothing changes if it fails. With ``max_cache_bytes`` set, least recently used keys are
        evicted to make room; an entry larger than the bound raises ``CacheError``.
        """
        feeds = self._validate_inputs(inputs)
        key = self._resolve_key(key)
        expected = self.expected_entry_bytes()
        if expected is not None:
            self._check_fits(key, expected)
        results = self._run_full(feeds)
        outputs = [results[n] for n in self._outputs]
        entry = CacheEntry(inputs={k: v.copy() for k, v in feeds.items()}, outputs=outputs,
                           tensors=self._own_caches(results, feeds, outputs))
        self._check_fits(key, entry.nbytes)
        with self._caches_lock:
            old = self._caches.get(key)
        if old is not None:
            old.lock.acquire_write()
            try:
                self._install(key, entry)
            finally:
                old.lock.release_write()
        else:
            self._install(key, entry)
        return [o.copy() for o in outputs]

    def run_dense(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run the plain dense model."""
        feeds = self._validate_inputs(inputs)
        return self._call_runner("dense", feeds, self._outputs)

    def run(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, mask: np.ndarray | None = None,
            key: Hashable | None = None, update_cache: bool = False, threshold: float | None = None,
            dilation: int | None = None) -> list[np.ndarray]:
        """Run the edited inputs incrementally against the cache of ``key``; return the outputs.

        With ``update_cache=True`` the edit becomes the key's new original, all or nothing: if the
        call raises, the key's caches, inputs and outputs are exactly as before.
        """
        start = time.perf_counter()
        feeds = self._validate_inputs(inputs)
        key = self._resolve_key(key)
        self._check_mask_options(threshold, dilation)
        given_mask = self._normalize_mask(mask) if mask is not None else None
        entry = self._acquire(key, write=update_cache)
        try:
            self._check_static_inputs(feeds, entry, key)
            pixel_mask = self._pixel_mask(feeds, entry, given_mask, threshold, dilation)
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

    def expected_macs(self, mask: np.ndarray, *, dilation: int | None = None) -> tuple[int, int, dict[str, TileIndex]]:
        """(dense MACs, executed MACs, tile indices) that ``run(mask=mask, dilation=dilation)`` would
        have, without running anything (the mask is dilated as ``run`` dilates it)."""
        self._check_mask_options(None, dilation)
        tiles = tiles_for_mask(self.manifest, self._normalize_mask(mask), dilation)
        return self._dense_macs(), self._executed_macs(tiles), tiles

    def expected_entry_bytes(self) -> int | None:
        """Bytes one primed key will hold, from the manifest (None if the manifest lacks shapes)."""
        total = 0
        for spec in (*self.manifest["caches"], *self._inputs, *self.manifest["outputs"]):
            if "shape" not in spec or "dtype" not in spec:
                return None
            total += math.prod(int(d) for d in spec["shape"]) * np.dtype(spec["dtype"]).itemsize
        return total

    # ----- cache store --------------------------------------------------------------------------
    @staticmethod
    def _check_max_bytes(value: int | None) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise CacheError(f"max_cache_bytes must be a positive integer or None, got {value!r}")
        return int(value)

    @staticmethod
    def _resolve_key(key: Hashable | None) -> Hashable:
        if key is None:
            return DEFAULT_KEY
        try:
            hash(key)
        except TypeError as exc:
            raise CacheError(f"cache key {key!r} is not hashable (use a str, int or tuple)") from exc
        return key

    def _check_fits(self, key: Hashable, nbytes: int) -> None:
        bound = self._max_cache_bytes
        if bound is not None and nbytes > bound:
            raise CacheError(f"the cache of key {key!r} needs {_format_bytes(nbytes)}, more than "
                             f"max_cache_bytes = {_format_bytes(bound)}; raise max_cache_bytes")

    def _install(self, key: Hashable, entry: CacheEntry) -> None:
        with self._caches_lock:
            self._caches[key] = entry
            self._caches.move_to_end(key)
            self._evicted.pop(key, None)
            self._evict_locked(keep=key)

    def _evict_locked(self, keep: Hashable | None) -> None:
        """Evict least recently used keys (never ``keep``) until the entries fit the bound."""
        bound = self._max_cache_bytes
        if bound is None:
            return
        total = sum(e.nbytes for e in self._caches.values())
        for victim in [k for k in self._caches if k != keep]:
            if total <= bound:
                break
            total -= self._caches.pop(victim).nbytes
            self._evicted[victim] = None
            while len(self._evicted) > _EVICTED_MEMORY:
                self._evicted.popitem(last=False)

    def _entry_locked(self, key: Hashable) -> CacheEntry:
        """The entry of ``key``; the caller holds ``_caches_lock``."""
        entry = self._caches.get(key)
        if entry is not None:
            return entry
        if key in self._evicted:
            raise CacheError(f"cache key {key!r} was evicted (least recently used) to stay under max_cache_bytes = "
                             f"{_format_bytes(self._max_cache_bytes or 0)}; prime it again")
        if not self._caches:
            raise CacheError(f"no cache for key {key!r}: run() before prime(); call engine.prime(original_inputs, "
                             f"key={key!r}) first")
        primed = list(self._caches)
        more = f" and {len(primed) - 10} more" if len(primed) > 10 else ""
        raise CacheError(f"unknown cache key {key!r}; primed keys: {primed[:10]}{more}")

    def _entry(self, key: Hashable) -> CacheEntry:
        with self._caches_lock:
            return self._entry_locked(key)

    def _acquire(self, key: Hashable, *, write: bool) -> CacheEntry:
        """The current entry of ``key`` with its lock held (shared or exclusive); marks it used."""
        while True:
            entry = self._entry(key)
            (entry.lock.acquire_write if write else entry.lock.acquire_read)()
            with self._caches_lock:
                current = self._caches.get(key)
                if current is entry:
                    self._caches.move_to_end(key)
                    return entry
            # Replaced by a concurrent prime or evicted while we waited: start over.
            (entry.lock.release_write if write else entry.lock.release_read)()

    def _own_caches(self, results: Mapping[str, np.ndarray], feeds: Mapping[str, np.ndarray],
                    outputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The caches from FULL's results as C-contiguous, writable arrays that alias nothing else.

        A backend may return one array for two names or a view of a feed (the PyTorch executor
        returns graph inputs as views), and outputs are handed to the caller; caches are updated in
        place, so each gets its own memory.
        """
        others: list[np.ndarray] = [*feeds.values(), *outputs]
        tensors = {}
        for c in self.manifest["caches"]:
            array = np.asarray(results[c["source"]])
            if array.dtype != np.dtype(c["dtype"]) or list(array.shape) != list(c["shape"]):
                raise BackendError(f"the FULL graph returned cache source '{c['source']}' with shape "
                                   f"{list(array.shape)} and dtype {array.dtype}, expected {c['shape']} {c['dtype']}")
            if not (array.flags.c_contiguous and array.flags.writeable) or \
                    any(np.may_share_memory(array, o) for o in others):
                array = np.array(array, order="C", copy=True)
            tensors[c["name"]] = array
            others.append(array)
        return tensors

    # ----- validation -------------------------------------------------------------------------
    def _validate_inputs(self, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        specs = {i["name"]: i for i in self._inputs}
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in specs]
            if unknown:
                raise InputError(f"unknown input name(s) {unknown}; the engine's inputs are {list(specs)}")
            missing = [k for k in specs if k not in inputs]
            if missing:
                raise InputError(f"missing input(s) {missing}; the engine's inputs are {list(specs)}")
            items = dict(inputs)
        elif isinstance(inputs, np.ndarray) or (isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes))):
            seq = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            if len(seq) != len(specs):
                raise InputError(f"expected {len(specs)} inputs ({list(specs)}), got {len(seq)}")
            items = dict(zip(specs, seq))
        else:
            raise InputError(f"inputs must be a mapping from input name to array or a sequence of arrays in the "
                             f"order {list(specs)}, got {type(inputs).__name__}")
        return {name: self._validate_input(name, value, specs[name]) for name, value in items.items()}

    @staticmethod
    def _validate_input(name: str, value: Any, spec: Mapping[str, Any]) -> np.ndarray:
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise InputError(f"input '{name}' is not an array: {exc}") from exc
        want = np.dtype(spec["dtype"])
        converted_from = None
        if array.dtype != want:
            if array.dtype.kind in "fiu" and want.kind in "fiu" and np.can_cast(array.dtype, want, "same_kind"):
                converted_from = array.dtype
                with np.errstate(over="ignore", invalid="ignore"):
                    array = array.astype(want)
            else:
                raise InputError(f"input '{name}' has dtype {array.dtype}, expected {want} (or a numeric dtype "
                                 f"that converts to it)")
        if list(array.shape) != list(spec["shape"]):
            raise InputError(f"input '{name}' has shape {list(array.shape)}, expected {list(spec['shape'])}")
        if array.dtype.kind == "f":
            bad = ~np.isfinite(array)
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                after = f" after conversion from {converted_from} to {want}" if converted_from is not None else ""
                raise InputError(f"input '{name}' contains {int(bad.sum())} NaN or Inf value(s){after}, the first at "
                                 f"index {first}; sigec refuses non-finite inputs")
        return np.asarray(array, order="C")

    @staticmethod
    def _check_mask_options(threshold: float | None, dilation: int | None) -> None:
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

    def _check_static_inputs(self, feeds: Mapping[str, np.ndarray], entry: CacheEntry, key: Hashable) -> None:
        for name, value in feeds.items():
            if name not in self._spatial and not np.array_equal(value, entry.inputs[name]):
                raise InputError(f"input '{name}' differs from the value primed for key {key!r}; non-spatial inputs "
                                 f"(e.g. a timestep) select the cache: prime a key with this value")

    def _normalize_mask(self, mask: np.ndarray) -> np.ndarray:
        return normalize_mask(mask, self.manifest["mask_program"]["input_size"], int(self.manifest.get("batch", 1)))

    def _pixel_mask(self, feeds: Mapping[str, np.ndarray], entry: CacheEntry, mask: np.ndarray | None,
                    threshold: float | None, dilation: int | None) -> np.ndarray:
        program = self.manifest["mask_program"]
        if mask is not None:
            pixel = mask
        else:
            thr = float(program["threshold"] if threshold is None else threshold)
            pixel = None
            for name in self._spatial:
                diff = np.abs(feeds[name] - entry.inputs[name]).max(axis=1) > thr
                pixel = diff if pixel is None else pixel | diff
        return dilate_for_run(program, pixel, dilation)

    # ----- execution --------------------------------------------------------------------------
    def _call_runner(self, graph: str, feeds: Mapping[str, np.ndarray], names: Sequence[str]) -> list[np.ndarray]:
        """Run one graph; unexpected backend exceptions become ``BackendError`` naming the graph."""
        try:
            results = list(self._runners[graph].run(feeds, list(names)))
        except (SigecError, MemoryError):
            raise
        except Exception as exc:
            raise BackendError(f"the {graph.upper()} graph failed: {type(exc).__name__}: {exc}") from exc
        if len(results) != len(names):
            raise BackendError(f"the {graph.upper()} graph returned {len(results)} values for {len(names)} "
                               f"requested outputs")
        return results

    def _run_full(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The FULL graph's outputs and cache sources by name."""
        cache_sources = sorted({c["source"] for c in self.manifest["caches"]})
        names = self._outputs + [s for s in cache_sources if s not in self._outputs and s not in feeds]
        results = dict(zip(names, self._call_runner("full", feeds, names)))
        # A cache of a model input (a timestep used directly by the sparse region) is the input itself.
        results.update({s: feeds[s] for s in cache_sources if s in feeds and s not in results})
        return results

    def _fractions(self, tiles: Mapping[str, TileIndex]) -> dict[str, float]:
        return {name: t.fraction for name, t in tiles.items()}

    def _tile_feeds(self, tiles: Mapping[str, TileIndex]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, t in tiles.items():
            feeds[coords_input(name)] = t.coords
            feeds[grid_input(name)] = t.grid
        return feeds

    def _run_sparse(self, feeds: dict[str, np.ndarray], entry: CacheEntry, tiles: Mapping[str, TileIndex],
                    update_cache: bool) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        all_feeds = {**feeds, **entry.tensors, **self._tile_feeds(tiles)}
        update_names = [u["output"] for u in self.manifest["updates"]] if update_cache else []
        results = self._call_runner("sparse", all_feeds, self._outputs + update_names)
        outputs = results[:len(self._outputs)]
        return outputs, dict(zip(update_names, results[len(self._outputs):]))

    def _check_outputs(self, entry: CacheEntry, outputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Copies of new outputs for the entry, checked against the primed outputs' shapes and dtypes."""
        copies = []
        for name, new, old in zip(self._outputs, outputs, entry.outputs):
            new = np.asarray(new)
            if new.shape != old.shape or new.dtype != old.dtype:
                raise BackendError(f"output '{name}' has shape {list(new.shape)} {new.dtype}, the primed one "
                                   f"{list(old.shape)} {old.dtype}: cannot update the cache")
            copies.append(new.copy())
        return copies

    def _prepare_updates(self, entry: CacheEntry, updates: Mapping[str, np.ndarray],
                         tiles: Mapping[str, TileIndex]) -> list[_PreparedUpdate]:
        """Validate every tile update and record the tiles it overwrites; writes nothing."""
        tile_sizes = {r["name"]: int(r["tile"]) for r in self.manifest["resolutions"]}
        prepared = []
        for u in self.manifest["updates"]:
            name, cache, res = u["output"], u["cache"], u["resolution"]
            if name not in updates:
                raise BackendError(f"the SPARSE graph did not return update '{name}' for cache '{cache}'")
            if res not in tiles or cache not in entry.tensors:
                raise CacheError(f"update '{name}' refers to resolution '{res}' or cache '{cache}', which this "
                                 f"engine does not have")
            base, coords, tile = entry.tensors[cache], tiles[res].coords, tile_sizes[res]
            vals = np.asarray(updates[name])
            want = (coords.shape[0], base.shape[1], tile, tile)
            if vals.shape != want:
                raise BackendError(f"update '{name}' for cache '{cache}' has shape {list(vals.shape)}, expected "
                                   f"{list(want)} ({coords.shape[0]} active tiles of {res})")
            if not np.can_cast(vals.dtype, base.dtype, "same_kind"):
                raise BackendError(f"update '{name}' has dtype {vals.dtype}, cache '{cache}' holds {base.dtype}")
            grid = (base.shape[0], -(-base.shape[2] // tile), -(-base.shape[3] // tile))
            if coords.size and ((coords < 0).any() or (coords >= np.asarray(grid)).any()):
                raise CacheError(f"tile coordinates of {res} fall outside the tile grid {list(grid)} of cache '{cache}'")
            if not (base.flags.c_contiguous and base.flags.writeable):
                raise CacheError(f"cache '{cache}' of this key is not a writable C-contiguous array")
            prepared.append(_PreparedUpdate(cache, np.ascontiguousarray(vals, dtype=base.dtype), coords,
                                            _gather_tiles(base, coords, tile)))
        return prepared

    def _scatter(self, base: np.ndarray, vals: np.ndarray, coords: np.ndarray) -> None:
        """Write tiles into a cache (a seam: tests replace it to inject faults in the write phase)."""
        scatter_tiles_inplace(base, vals, coords)

    def _apply_updates(self, entry: CacheEntry, updates: Mapping[str, np.ndarray], tiles: Mapping[str, TileIndex],
                       feeds: Mapping[str, np.ndarray], outputs: Sequence[np.ndarray]) -> None:
        """Make the edit the entry's new original: all or nothing.

        1. Prepare (may raise, writes nothing): every update the manifest lists is present, has
           shape [active tiles, cache channels, T, T] and a dtype that converts to its cache's,
           its tile coordinates lie in the cache's grid, the cache is writable and contiguous, the
           new outputs match the primed ones; the new tiles, inputs and outputs are copied, and the
           tiles about to be overwritten are saved (the undo log).
        2. Write: tiles are scattered cache by cache (only the active tiles). Nothing left here can
           fail on valid data; should it still raise (out of memory, an interrupt), the undo log is
           written back before the exception propagates, so the caches are exactly as before.
        3. The new inputs and outputs are swapped in by reference assignment (cannot fail).
        The caller holds the entry's exclusive lock.
        """
        prepared = self._prepare_updates(entry, updates, tiles)
        new_outputs = self._check_outputs(entry, outputs)
        new_inputs = {k: v.copy() for k, v in feeds.items()}
        written: list[_PreparedUpdate] = []
        try:
            for p in prepared:
                written.append(p)
                self._scatter(entry.tensors[p.cache], p.vals, p.coords)
        except BaseException:
            for p in reversed(written):
                scatter_tiles_inplace(entry.tensors[p.cache], p.undo, p.coords)
            raise
        finally:
            self._forget_device_copies([entry.tensors[p.cache] for p in written])
        entry.inputs = new_inputs
        entry.outputs = new_outputs

    def _forget_device_copies(self, arrays: Sequence[np.ndarray]) -> None:
        """Tell runners that keep device copies of caches (runtime/device_mirror.py) which changed."""
        for runner in self._runners.values():
            forget = getattr(runner, "forget", None)
            if forget is not None:
                forget(arrays)

    def _run_dense_path(self, feeds: dict[str, np.ndarray], entry: CacheEntry, update_cache: bool, start: float,
                        tiles: Mapping[str, TileIndex]) -> list[np.ndarray]:
        if update_cache:
            # FULL recomputes every cache: build a complete new set, then swap it in (all or nothing).
            results = self._run_full(feeds)
            outputs = [results[n] for n in self._outputs]
            new_outputs = self._check_outputs(entry, outputs)
            tensors = self._own_caches(results, feeds, outputs)
            entry.tensors, entry.inputs, entry.outputs = tensors, {k: v.copy() for k, v in feeds.items()}, new_outputs
        else:
            outputs = self._call_runner("dense", feeds, self._outputs)
        self._record("dense", start, tiles, self._dense_macs())
        return outputs

    def _dense_macs(self) -> int:
        return self._costs.dense

    def _executed_macs(self, tiles: Mapping[str, TileIndex]) -> int:
        return self._costs.executed(tiles)

    def _record(self, path: str, start: float, tiles: Mapping[str, TileIndex], executed: int) -> None:
        self._local.stats = RunStats(path=path, wall_ms=(time.perf_counter() - start) * 1e3,
                                     active_fraction=self._fractions(tiles),
                                     active_tiles={k: t.count for k, t in tiles.items()},
                                     dense_macs=self._dense_macs(), executed_macs=executed)
