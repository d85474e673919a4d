"""The production engine: prime caches with the original inputs, then run edits sparsely.

The Engine is a facade over small parts: runtime/input_validation.py checks what callers pass,
runtime/cache_store.py holds the primed entries (LRU order, the byte bound), runtime/rwlock.py is
an entry's lock, runtime/tiles.py moves tiles in and out of caches, runtime/costs.py counts MACs.
This module executes: ``prime`` (FULL), ``run`` (mask -> tiles -> SPARSE, or DENSE past the
fallback fraction), ``run_dense``, and the cache updates of ``run(update_cache=True)``.

Threading contract
------------------
``prime``, ``run``, ``run_dense``, ``drop``, ``cache_keys`` and ``cache_bytes`` may be called from
many threads at once, on the same key or on different keys:

- ``run`` without ``update_cache`` holds its key's entry lock shared while it reads the entry;
  ``run(update_cache=True)`` holds it exclusively for the whole run (read, compute, write);
  ``prime`` on an existing key holds the old entry's lock exclusively while it swaps the new entry
  in. A run therefore sees a key's caches entirely before or entirely after any update or
  re-prime, never a mix. Waiting writers have priority over new readers (runtime/rwlock.py), so a
  stream of runs cannot starve an update.
- Runs on different keys never wait for each other; a run that acquired an entry which a
  concurrent ``prime`` replaced (or an eviction removed) meanwhile starts over on the current
  entry (or raises ``CacheError`` for an evicted key). Details: runtime/cache_store.py.
- ``engine.stats`` is thread-local: it describes the last ``run`` made by the calling thread.
- The backends' runners are called concurrently; ONNX Runtime sessions and the PyTorch reference
  executor are safe for concurrent ``run`` calls. Results do not depend on concurrency (with the
  ``ort`` backend they are bit-identical to sequential runs, tested with 1 intra-op thread).
- Cache bindings (``bind_caches``, ONNX Runtime): a key's caches are bound to the SPARSE session
  once (``entry.bindings``, runtime/ort_binding.py) and reused by its runs, which then pass only the
  edited inputs and tile indices. Concurrent runs on one key each take their own ``IOBinding``
  from the entry's bindings, never share one. The bindings are made by a run holding the entry's
  lock shared (two first runs may both make them; one is kept, both are valid), reset to None by
  ``run(update_cache=True)`` under the exclusive lock, and freed with the entry on re-prime, drop
  or eviction.

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
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from sigec.core.errors import BackendError, CacheError, SigecError
from sigec.core.mask_program import TileIndex, dilate_for_run, normalize_mask, run_mask_program, tiles_for_mask
from sigec.core.names import coords_input, grid_input
from sigec.core.options import DENSE_FALLBACK_FRACTION
from sigec.runtime import costs
from sigec.runtime.cache_store import DEFAULT_KEY, CacheEntry, CacheStore, cast_tiles, check_cache, resolve_key
from sigec.runtime.input_validation import (Inputs, check_finite, check_finite_in_tiles, check_mask_options,
                                            check_static_inputs, validate_inputs)
from sigec.runtime.tiles import gather_tiles, scatter_tiles_inplace, tile_grid

__all__ = ["DEFAULT_KEY", "CacheEntry", "Engine", "RunStats"]


@dataclass
class RunStats:
    """What the last ``run`` did.

    ``phases_ms`` splits ``wall_ms`` (see ``PHASES``): validate (inputs, mask argument, static
    inputs, finite values), wait (the entry's lock), mask (pixel mask and dilation), tiles (mask
    program, MAC count), feeds (the run's feeds or cache bindings), execute (the graph), finish
    (outputs, cache updates).
    """

    path: str
    wall_ms: float
    active_fraction: dict[str, float]
    active_tiles: dict[str, int]
    dense_macs: int
    executed_macs: int
    phases_ms: dict[str, float] = field(default_factory=dict)

    @property
    def mac_reduction(self) -> float:
        """Dense MACs over executed MACs."""
        return self.dense_macs / max(self.executed_macs, 1)


PHASES = ("validate", "wait", "mask", "tiles", "feeds", "execute", "finish")


class _Clock:
    """Splits one call's wall time into phases: ``mark(phase)`` adds the time since the last mark."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + (now - self.last) * 1e3
        self.last = now


@dataclass
class _PreparedUpdate:
    """One validated tile update: where it goes, the new tiles and the tiles they overwrite."""

    cache: str
    vals: np.ndarray
    coords: np.ndarray | None  # None: a whole-cache update
    undo: np.ndarray


def _write_update(base: np.ndarray, vals: np.ndarray, coords: np.ndarray | None) -> None:
    """Write an update's tiles at ``coords`` into ``base`` (the whole array when ``coords`` is None)."""
    if coords is None:
        np.copyto(base, vals)
    else:
        scatter_tiles_inplace(base, vals, coords)


class Engine:
    """A loaded sigec engine (see ``sigec.load``).

    ``bind_caches`` (default True): SPARSE runs use the runner's cache bindings when it has them
    (``bind_caches`` method, the ONNX Runtime runner); False feeds every cache by name on every run
    (the previous behaviour, kept to measure the difference: tools/run_overhead.py).
    """

    def __init__(self, manifest: Mapping[str, Any], runners: Mapping[str, Any], *, path: str = "",
                 dense_fallback_fraction: float | None = None, max_cache_bytes: int | None = None,
                 bind_caches: bool = True) -> None:
        self.manifest = dict(manifest)
        self.path = path
        self._runners = runners
        self._inputs = list(self.manifest["inputs"])
        self._outputs = [o["name"] for o in self.manifest["outputs"]]
        self._spatial = [i["name"] for i in self._inputs if i["spatial"]]
        self._mask_size = self.manifest["mask_program"]["input_size"]  # what normalize_mask needs
        self._batch = int(self.manifest.get("batch", 1))
        self._store = CacheStore(max_cache_bytes)
        options = self.manifest.get("options", {})
        # Fall back to the dense graph when the sparse run would execute at least this fraction of
        # the dense MACs (the sparse path's overheads make it slower beyond that point).
        self.dense_fallback_fraction = float(dense_fallback_fraction if dense_fallback_fraction is not None
                                             else options.get("dense_fallback_fraction", DENSE_FALLBACK_FRACTION))
        self._local = threading.local()
        self._costs = costs.CostModel(self.manifest.get("nodes", []))
        self.bind_caches = bind_caches
        self._tile_sizes = {r["name"]: int(r["tile"]) for r in self.manifest["resolutions"]}
        self._resolution_of_size = {tuple(int(v) for v in r["size"]): r["name"] for r in self.manifest["resolutions"]}

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
        return self._store.max_bytes

    @max_cache_bytes.setter
    def max_cache_bytes(self, value: int | None) -> None:
        """Change the bound; least recently used keys are evicted at once until the entries fit."""
        self._store.max_bytes = value

    def cache_keys(self) -> list[Hashable]:
        """Keys that have been primed (and not dropped or evicted), least recently used first."""
        return self._store.keys()

    def cache_bytes(self, key: Hashable | None = None) -> int:
        """Bytes held by the cache of ``key`` (all keys when None)."""
        return self._store.nbytes(None if key is None else resolve_key(key))

    def drop(self, key: Hashable | None = None) -> None:
        """Forget the cache of ``key`` (nothing happens for a key that is not primed)."""
        self._store.drop(resolve_key(key))

    def prime(self, inputs: Inputs, *, key: Hashable | None = None) -> list[np.ndarray]:
        """Run the FULL graph on the original inputs and keep its caches under ``key``; return the outputs.

        Nothing changes if it fails. With ``max_cache_bytes`` set, least recently used keys are
        evicted to make room; an entry larger than the bound raises ``CacheError``.
        """
        feeds = validate_inputs(inputs, self._inputs)
        key = resolve_key(key)
        expected = self.expected_entry_bytes()
        if expected is not None:
            self._store.check_fits(key, expected)  # refuse before the expensive FULL run
        results = self._run_full(feeds)
        outputs = [results[n] for n in self._outputs]
        entry = CacheEntry(inputs={k: v.copy() for k, v in feeds.items()}, outputs=outputs,
                           tensors=self._own_caches(results, feeds, outputs))
        self._store.check_fits(key, entry.nbytes)
        self._store.install(key, entry)
        return [o.copy() for o in outputs]

    def run_dense(self, inputs: Inputs) -> list[np.ndarray]:
        """Run the plain dense model."""
        feeds = validate_inputs(inputs, self._inputs)
        return self._call_runner("dense", feeds, self._outputs)

    def run(self, inputs: Inputs, *, mask: np.ndarray | None = None, key: Hashable | None = None,
            update_cache: bool = False, threshold: float | None = None, dilation: int | None = None) -> list[np.ndarray]:
        """Run the edited inputs incrementally against the cache of ``key``; return the outputs.

        With ``update_cache=True`` the edit becomes the key's new original, all or nothing: if the
        call raises, the key's caches, inputs and outputs are exactly as before.

        With a ``mask`` and without ``update_cache``, spatial inputs are checked for NaN and Inf
        before a sparse run only inside the bounding box of the active tiles of their resolution
        (which cover the dilated mask), and wholly before a dense one: values outside the mask must
        equal the primed ones (the mask's contract) and are not read anew.
        """
        clock = _Clock()
        # A sparse run reads the edited values only in the active tiles: check them there (see above).
        deferred = self._spatial if mask is not None and not update_cache else ()
        feeds = validate_inputs(inputs, self._inputs, defer_finite=deferred)
        key = resolve_key(key)
        check_mask_options(threshold, dilation)
        given_mask = normalize_mask(mask, self._mask_size, self._batch) if mask is not None else None
        clock.mark("validate")
        entry = self._store.acquire(key, write=update_cache)
        clock.mark("wait")
        try:
            check_static_inputs(feeds, entry.inputs, self._spatial, key)
            clock.mark("validate")
            pixel_mask = self._pixel_mask(feeds, entry, given_mask, threshold, dilation)
            empty = not pixel_mask.any()
            clock.mark("mask")
            if empty:
                if update_cache:
                    entry.inputs = {k: v.copy() for k, v in feeds.items()}
                outputs = [o.copy() for o in entry.outputs]
                clock.mark("finish")
                self._record("empty", clock, {}, 0)
                return outputs
            tiles = run_mask_program(self.manifest["mask_program"], self.manifest["resolutions"], pixel_mask)
            executed = self._executed_macs(tiles)
            clock.mark("tiles")
            if executed >= self.dense_fallback_fraction * max(self._dense_macs(), 1):
                for name in deferred:  # the dense graph reads every value
                    check_finite(name, feeds[name])
                clock.mark("validate")
                return self._run_dense_path(feeds, entry, update_cache, clock, tiles)
            self._check_finite_in_tiles(feeds, deferred, tiles)
            clock.mark("validate")
            outputs, updates = self._run_sparse(feeds, entry, tiles, update_cache, clock)
            if update_cache:
                self._apply_updates(entry, updates, tiles, feeds, outputs)
            clock.mark("finish")
            self._record("sparse", clock, tiles, executed)
            return outputs
        finally:
            entry.lock.release(write=update_cache)

    def expected_macs(self, mask: np.ndarray, *, dilation: int | None = None) -> tuple[int, int, dict[str, TileIndex]]:
        """(dense MACs, executed MACs, tile indices) that ``run(mask=mask, dilation=dilation)`` would
        have, without running anything (the mask is dilated as ``run`` dilates it)."""
        check_mask_options(None, dilation)
        tiles = tiles_for_mask(self.manifest, normalize_mask(mask, self._mask_size, self._batch), dilation)
        return self._dense_macs(), self._executed_macs(tiles), tiles

    def expected_entry_bytes(self) -> int | None:
        """Bytes one primed key will hold, from the manifest (None if the manifest lacks shapes)."""
        total = 0
        for spec in (*self.manifest["caches"], *self._inputs, *self.manifest["outputs"]):
            if "shape" not in spec or "dtype" not in spec:
                return None
            total += math.prod(int(d) for d in spec["shape"]) * np.dtype(spec["dtype"]).itemsize
        return total

    # ----- masks ------------------------------------------------------------------------------
    def _pixel_mask(self, feeds: Mapping[str, np.ndarray], entry: CacheEntry, mask: np.ndarray | None,
                    threshold: float | None, dilation: int | None) -> np.ndarray:
        """The run's pixel mask: the given one, or where a spatial input differs from the primed one
        by more than the threshold; dilated as ``dilate_for_run`` does."""
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

    def _check_finite_in_tiles(self, feeds: Mapping[str, np.ndarray], names: Sequence[str],
                               tiles: Mapping[str, TileIndex]) -> None:
        """Check the inputs ``names`` for NaN and Inf where a sparse run reads them anew: the bounding box of
        the active tiles of the resolution of the input's size (they cover the dilated mask); wholly if
        there is none."""
        for name in names:
            array = feeds[name]
            res = self._resolution_of_size.get(tuple(array.shape[2:]))
            if res is None or res not in tiles:
                check_finite(name, array)
            else:
                check_finite_in_tiles(name, array, tiles[res].coords, self._tile_sizes[res])

    # ----- execution --------------------------------------------------------------------------
    def _call_runner(self, graph: str, feeds: Mapping[str, np.ndarray], names: Sequence[str],
                     bindings: Any = None) -> list[np.ndarray]:
        """Run one graph (through ``bindings``, the cache bindings of its runner, when given); unexpected
        backend exceptions become ``BackendError`` naming the graph."""
        run = bindings.run if bindings is not None else self._runners[graph].run
        try:
            results = list(run(feeds, list(names)))
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
            check_cache(c, array)  # dtype (half caches: float16/bfloat16) and shape as the manifest says
            if not (array.flags.c_contiguous and array.flags.writeable) or \
                    any(np.may_share_memory(array, o) for o in others):
                array = np.array(array, order="C", copy=True)
            tensors[c["name"]] = array
            others.append(array)
        return tensors

    def _fractions(self, tiles: Mapping[str, TileIndex]) -> dict[str, float]:
        return {name: t.fraction for name, t in tiles.items()}

    def _tile_feeds(self, tiles: Mapping[str, TileIndex]) -> dict[str, np.ndarray]:
        feeds = {}
        for name, t in tiles.items():
            feeds[coords_input(name)] = t.coords
            feeds[grid_input(name)] = t.grid
        return feeds

    def _cache_bindings(self, entry: CacheEntry) -> Any:
        """The SPARSE runner's bindings of the entry's caches, made now if missing or stale; None when
        the runner has none (or ``bind_caches`` is off). The caller holds the entry's lock."""
        runner = self._runners["sparse"]
        make = getattr(runner, "bind_caches", None)
        if not self.bind_caches or make is None:
            return None
        bindings = entry.bindings
        if bindings is None or not bindings.serves(runner, entry.tensors):
            bindings = make(entry.tensors)
            entry.bindings = bindings  # a concurrent first run may store its own: both are valid
        return bindings

    def _run_sparse(self, feeds: dict[str, np.ndarray], entry: CacheEntry, tiles: Mapping[str, TileIndex],
                    update_cache: bool, clock: _Clock) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        run_feeds = {**feeds, **self._tile_feeds(tiles)}
        update_names = [u["output"] for u in self.manifest["updates"]] if update_cache else []
        bindings = self._cache_bindings(entry)
        if bindings is None:
            run_feeds.update(entry.tensors)
        clock.mark("feeds")
        results = self._call_runner("sparse", run_feeds, self._outputs + update_names, bindings)
        clock.mark("execute")
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
        tile_sizes = self._tile_sizes
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
            if u.get("whole"):
                prepared.append(self._prepare_whole_update(name, cache, base, vals))
                continue
            want = (coords.shape[0], base.shape[1], tile, tile)
            if vals.shape != want:
                raise BackendError(f"update '{name}' for cache '{cache}' has shape {list(vals.shape)}, expected "
                                   f"{list(want)} ({coords.shape[0]} active tiles of {res})")
            if not np.can_cast(vals.dtype, base.dtype, "same_kind"):
                raise BackendError(f"update '{name}' has dtype {vals.dtype}, cache '{cache}' holds {base.dtype}")
            grid = tile_grid(base.shape, tile)
            if coords.size and ((coords < 0).any() or (coords >= np.asarray(grid)).any()):
                raise CacheError(f"tile coordinates of {res} fall outside the tile grid {list(grid)} of cache '{cache}'")
            if not (base.flags.c_contiguous and base.flags.writeable):
                raise CacheError(f"cache '{cache}' of this key is not a writable C-contiguous array")
            # float32 tiles into a half cache: rounded explicitly here, before anything is written
            prepared.append(_PreparedUpdate(cache, cast_tiles(vals, base.dtype, cache), coords,
                                            gather_tiles(base, coords, tile)))
        return prepared

    @staticmethod
    def _prepare_whole_update(name: str, cache: str, base: np.ndarray, vals: np.ndarray) -> _PreparedUpdate:
        """A whole-cache update (a token cache): the new value, checked, and the old one as the undo log."""
        if vals.shape != base.shape:
            raise BackendError(f"update '{name}' for cache '{cache}' has shape {list(vals.shape)}, expected "
                               f"{list(base.shape)} (the whole cache)")
        if not np.can_cast(vals.dtype, base.dtype, "same_kind"):
            raise BackendError(f"update '{name}' has dtype {vals.dtype}, cache '{cache}' holds {base.dtype}")
        if not (base.flags.c_contiguous and base.flags.writeable):
            raise CacheError(f"cache '{cache}' of this key is not a writable C-contiguous array")
        return _PreparedUpdate(cache, np.ascontiguousarray(vals, dtype=base.dtype), None, base.copy())

    def _scatter(self, base: np.ndarray, vals: np.ndarray, coords: np.ndarray | None) -> None:
        """Write tiles (or, ``coords`` None, the whole cache) into a cache (a seam: tests replace it to
        inject faults in the write phase)."""
        _write_update(base, vals, coords)

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
                _write_update(entry.tensors[p.cache], p.undo, p.coords)
            raise
        finally:
            self._forget_device_copies([entry.tensors[p.cache] for p in written])
            entry.bindings = None  # the caches changed: later runs bind them anew
        entry.inputs = new_inputs
        entry.outputs = new_outputs

    def _forget_device_copies(self, arrays: Sequence[np.ndarray]) -> None:
        """Tell runners that keep device copies of caches (runtime/device_mirror.py) which changed."""
        for runner in self._runners.values():
            forget = getattr(runner, "forget", None)
            if forget is not None:
                forget(arrays)

    def _run_dense_path(self, feeds: dict[str, np.ndarray], entry: CacheEntry, update_cache: bool, clock: _Clock,
                        tiles: Mapping[str, TileIndex]) -> list[np.ndarray]:
        if update_cache:
            # FULL recomputes every cache: build a complete new set, then swap it in (all or nothing).
            results = self._run_full(feeds)
            clock.mark("execute")
            outputs = [results[n] for n in self._outputs]
            new_outputs = self._check_outputs(entry, outputs)
            tensors = self._own_caches(results, feeds, outputs)
            entry.tensors, entry.inputs, entry.outputs = tensors, {k: v.copy() for k, v in feeds.items()}, new_outputs
            entry.bindings = None  # they bound the replaced arrays
        else:
            outputs = self._call_runner("dense", feeds, self._outputs)
            clock.mark("execute")
        clock.mark("finish")
        self._record("dense", clock, tiles, self._dense_macs())
        return outputs

    def _dense_macs(self) -> int:
        return self._costs.dense

    def _executed_macs(self, tiles: Mapping[str, TileIndex]) -> int:
        return self._costs.executed(tiles)

    def _record(self, path: str, clock: _Clock, tiles: Mapping[str, TileIndex], executed: int) -> None:
        self._local.stats = RunStats(path=path, wall_ms=(time.perf_counter() - clock.start) * 1e3,
                                     active_fraction=self._fractions(tiles),
                                     active_tiles={k: t.count for k, t in tiles.items()},
                                     dense_macs=self._dense_macs(), executed_macs=executed,
                                     phases_ms=dict(clock.phases))
