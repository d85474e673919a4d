"""Primed cache entries by key: least-recently-used order, the byte bound, the evicted-key memory.

Threading contract
------------------
- Every entry has a readers-writer lock (runtime/rwlock.py). ``acquire`` returns a key's current
  entry with that lock held shared (a run) or exclusively (``run(update_cache=True)``); ``install``
  swaps a new entry in while holding the old entry's lock exclusively (a re-prime). A call therefore
  sees a key's caches entirely before or entirely after any update or re-prime, never a mix.
- The store's dictionary has its own short lock, never held while waiting for an entry lock (or
  by a caller running a graph), so calls on different keys never wait for each other.
- An entry that was replaced (a concurrent ``install``) or evicted while ``acquire`` waited for its
  lock is released again, and ``acquire`` starts over on the current entry (or raises
  ``CacheError`` for an evicted key).

Memory
------
``max_bytes`` bounds the bytes held by all entries (``CacheEntry.nbytes``). ``install`` evicts the
least recently used keys (a key is used by ``install`` and ``acquire``) until the entries fit; the
new key itself is never evicted by its own install. ``check_fits`` refuses one entry larger than the
bound. An evicted entry still held by a running call is freed when that call lets go of it. The
last ``EVICTED_MEMORY`` evicted keys are remembered only to tell "evicted" from "never primed".

Half-precision caches
---------------------
A cache's dtype is the manifest's (``caches[].dtype``): float16 or bfloat16 for the caches the
compiler stores in half precision (passes/half_caches.py; bfloat16 arrays are ``ml_dtypes``', a
dependency of onnx), float32 otherwise. ``Engine.prime`` keeps what the FULL graph returns after
:func:`check_cache` (dtype, shape, and for float16 that the values fit its range); tile updates
arrive as float32 SPARSE outputs and are converted explicitly by :func:`cast_tiles` before
anything is written.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping

import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16" dtype name (half caches)
import numpy as np

from sigec.core.errors import BackendError, CacheError
from sigec.runtime.rwlock import ReadWriteLock

DEFAULT_KEY = "default"
EVICTED_MEMORY = 256  # how many evicted keys are remembered for clearer error messages


@dataclass
class CacheEntry:
    """Everything primed for one key: the original inputs and outputs and the FULL graph's caches.

    ``bindings`` is the SPARSE runner's binding of ``tensors`` (runtime/ort_binding.py; None until
    a run makes one): it reads the cache arrays in place, lives and dies with the entry (re-prime,
    drop, eviction), and whoever writes or replaces ``tensors`` resets it to None.
    """

    inputs: dict[str, np.ndarray]
    outputs: list[np.ndarray]
    tensors: dict[str, np.ndarray]
    lock: ReadWriteLock = field(default_factory=ReadWriteLock)
    bindings: Any = None

    @property
    def nbytes(self) -> int:
        """Bytes held by this entry."""
        return sum(a.nbytes for a in self.tensors.values()) + sum(a.nbytes for a in self.inputs.values()) + \
            sum(a.nbytes for a in self.outputs)


HALF_DTYPES = (np.dtype("float16"), np.dtype("bfloat16"))
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def check_cache(spec: Mapping[str, Any], array: np.ndarray) -> None:
    """Check a cache the FULL graph returned against its manifest entry ``spec``: dtype and shape
    (a mismatch is a BackendError), and for a float16 cache that every value is finite (the FULL
    graph's Cast turns values beyond +-65504 into infinities, which would corrupt every sparse run
    reading them: a CacheError suggesting bfloat16 or float32)."""
    if array.dtype != np.dtype(spec["dtype"]) or list(array.shape) != list(spec["shape"]):
        raise BackendError(f"the FULL graph returned cache source '{spec['source']}' with shape "
                           f"{list(array.shape)} and dtype {array.dtype}, expected {spec['shape']} {spec['dtype']}")
    if array.dtype == np.float16 and not np.isfinite(array).all():
        raise CacheError(f"cache '{spec['name']}' ({spec.get('origin', spec['source'])}) holds values beyond float16's "
                         f"range (+-{FLOAT16_MAX:g}) or non-finite values; compile with cache_dtype='bfloat16' or "
                         f"'float32'")


def cast_tiles(vals: np.ndarray, dtype: np.dtype, cache: str) -> np.ndarray:
    """Tiles to be written into cache ``cache`` of ``dtype``, as a C-contiguous array of that dtype.

    Float32 tiles into a float16/bfloat16 cache are rounded to the nearest value (ties to even:
    numpy's ``astype``, the same rounding as the FULL graph's Cast at ``prime``); a finite value
    that overflows float16 raises CacheError, before anything is written.
    """
    dtype = np.dtype(dtype)
    if vals.dtype == dtype:
        return np.ascontiguousarray(vals)
    with np.errstate(over="ignore"):  # overflow is reported below
        out = np.asarray(vals).astype(dtype, order="C")
    if dtype in HALF_DTYPES and not np.isfinite(out).all():
        overflow = np.isfinite(np.asarray(vals, np.float32)) & ~np.isfinite(out.astype(np.float32))
        if overflow.any():
            raise CacheError(f"an update of cache '{cache}' holds values beyond {dtype}'s range "
                             f"(largest {np.abs(vals[overflow]).max():g}); compile with cache_dtype='bfloat16' "
                             f"or 'float32'")
    return out


def format_bytes(n: int) -> str:
    """``n`` in bytes and MiB, for error messages."""
    return f"{n} bytes ({n / 2 ** 20:.2f} MiB)"


def resolve_key(key: Hashable | None) -> Hashable:
    """The key a call means: ``DEFAULT_KEY`` for None; an unhashable key raises ``CacheError``."""
    if key is None:
        return DEFAULT_KEY
    try:
        hash(key)
    except TypeError as exc:
        raise CacheError(f"cache key {key!r} is not hashable (use a str, int or tuple)") from exc
    return key


def check_max_bytes(value: int | None) -> int | None:
    """A valid bound (a positive integer) or None; anything else raises ``CacheError``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise CacheError(f"max_cache_bytes must be a positive integer or None, got {value!r}")
    return int(value)


class CacheStore:
    """Entries by (resolved) key, least recently used first, bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self._entries: OrderedDict[Hashable, CacheEntry] = OrderedDict()
        self._evicted: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()  # guards the two dictionaries and the bound
        self._max_bytes = check_max_bytes(max_bytes)

    @property
    def max_bytes(self) -> int | None:
        """Bound on the bytes held by all entries (None: unbounded)."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int | None) -> None:
        """Change the bound; least recently used keys are evicted at once until the entries fit."""
        value = check_max_bytes(value)
        with self._lock:
            self._max_bytes = value
            self._evict_locked(keep=None)

    def keys(self) -> list[Hashable]:
        """Keys held (not dropped or evicted), least recently used first."""
        with self._lock:
            return list(self._entries)

    def nbytes(self, key: Hashable | None = None) -> int:
        """Bytes held by the entry of ``key`` (all entries when None); an unknown key raises ``CacheError``."""
        with self._lock:
            if key is None:
                return sum(e.nbytes for e in self._entries.values())
            return self._entry_locked(key).nbytes

    def drop(self, key: Hashable) -> None:
        """Forget the entry of ``key`` (nothing happens for a key that is not held)."""
        with self._lock:
            self._entries.pop(key, None)

    def check_fits(self, key: Hashable, nbytes: int) -> None:
        """Raise ``CacheError`` if an entry of ``nbytes`` for ``key`` can never fit the bound."""
        bound = self._max_bytes
        if bound is not None and nbytes > bound:
            raise CacheError(f"the cache of key {key!r} needs {format_bytes(nbytes)}, more than "
                             f"max_cache_bytes = {format_bytes(bound)}; raise max_cache_bytes")

    def install(self, key: Hashable, entry: CacheEntry) -> None:
        """Make ``entry`` the entry of ``key`` (most recently used), then evict other keys to fit the bound.

        An existing entry is replaced while its lock is held exclusively, so calls using it finish
        first and later ones start over on ``entry``.
        """
        with self._lock:
            old = self._entries.get(key)
        if old is None:
            self._put(key, entry)
            return
        old.lock.acquire_write()
        try:
            self._put(key, entry)
        finally:
            old.lock.release_write()

    def entry(self, key: Hashable) -> CacheEntry:
        """The entry of ``key`` without taking its lock; an unknown or evicted key raises ``CacheError``."""
        with self._lock:
            return self._entry_locked(key)

    def acquire(self, key: Hashable, *, write: bool) -> CacheEntry:
        """The current entry of ``key`` with its lock held (shared, or exclusive if ``write``); marks it used.

        The caller releases it with ``entry.lock.release(write=write)``.
        """
        while True:
            entry = self.entry(key)
            entry.lock.acquire(write=write)
            with self._lock:
                if self._entries.get(key) is entry:
                    self._entries.move_to_end(key)
                    return entry
            # Replaced by a concurrent install or evicted while we waited: start over.
            entry.lock.release(write=write)

    def _put(self, key: Hashable, entry: CacheEntry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._evicted.pop(key, None)
            self._evict_locked(keep=key)

    def _evict_locked(self, keep: Hashable | None) -> None:
        """Evict least recently used keys (never ``keep``) until the entries fit the bound; holds ``_lock``."""
        bound = self._max_bytes
        if bound is None:
            return
        total = sum(e.nbytes for e in self._entries.values())
        for victim in [k for k in self._entries if k != keep]:
            if total <= bound:
                break
            total -= self._entries.pop(victim).nbytes
            self._evicted[victim] = None
            while len(self._evicted) > EVICTED_MEMORY:
                self._evicted.popitem(last=False)

    def _entry_locked(self, key: Hashable) -> CacheEntry:
        """The entry of ``key``; the caller holds ``_lock``."""
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        if key in self._evicted:
            raise CacheError(f"cache key {key!r} was evicted (least recently used) to stay under max_cache_bytes = "
                             f"{format_bytes(self._max_bytes or 0)}; prime it again")
        if not self._entries:
            raise CacheError(f"no cache for key {key!r}: run() before prime(); call engine.prime(original_inputs, "
                             f"key={key!r}) first")
        primed = list(self._entries)
        more = f" and {len(primed) - 10} more" if len(primed) > 10 else ""
        raise CacheError(f"unknown cache key {key!r}; primed keys: {primed[:10]}{more}")
