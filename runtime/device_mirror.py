"""Device-resident copies of an engine's caches for the PyTorch executor on a GPU.

The engine keeps every key's caches as host (numpy) arrays. Fed as they are, a CUDA run would copy
all of them to the GPU on every call (694 MiB for the 256-px UNet), which costs more than the sparse
work itself. :class:`DeviceMirror` uploads a cache array once and hands the same device tensor to
every later run, until

1. the engine writes into the host array (``run(update_cache=True)``): the engine calls
   :meth:`DeviceMirror.forget` for every array it changed, so the next run uploads it again;
2. the host array is garbage collected (a key re-primed, dropped or evicted): a weak-reference
   callback removes its device copy, so GPU memory follows the engine's ``max_cache_bytes``.

Only engine-owned arrays (inputs named ``cache::...``) are mirrored: the engine never changes them
except through (1). User inputs may be changed in place between calls and are always copied.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Iterable

import numpy as np

from sigec.core.names import CACHE_PREFIX



class DeviceMirror:
    """Host array -> device tensor, uploaded once per array (thread-safe)."""

    def __init__(self, upload: Callable[[np.ndarray], Any]) -> None:
        self._upload = upload
        self._copies: dict[int, tuple[weakref.ref, Any]] = {}
        self._lock = threading.Lock()
        self.uploads = 0  # how many arrays were copied to the device (for tests and diagnostics)

    def __len__(self) -> int:
        with self._lock:
            return len(self._copies)

    def get(self, array: np.ndarray) -> Any:
        """The device copy of ``array`` (uploaded now if it has none yet)."""
        key = id(array)
        with self._lock:
            found = self._copies.get(key)
            if found is not None and found[0]() is array:
                return found[1]
        tensor = self._upload(array)
        ref = weakref.ref(array, lambda _, key=key: self._discard(key))
        with self._lock:
            self._copies[key] = (ref, tensor)
            self.uploads += 1
        return tensor

    def forget(self, arrays: Iterable[np.ndarray]) -> None:
        """Drop the device copies of arrays whose contents changed on the host."""
        with self._lock:
            for array in arrays:
                found = self._copies.get(id(array))
                if found is not None and found[0]() is array:
                    del self._copies[id(array)]

    def _discard(self, key: int) -> None:
        with self._lock:
            found = self._copies.get(key)
            if found is not None and found[0]() is None:
                del self._copies[key]
