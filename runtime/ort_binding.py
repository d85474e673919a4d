"""One key's caches bound to an ONNX Runtime session once, reused by its SPARSE runs.

A SPARSE run reads every cache array of its key (up to hundreds of inputs), which change only when
the key is re-primed or updated, and a few small per-run inputs (the edited inputs, the tile
indices). Fed as a dictionary, every run converts every array to an ONNX Runtime value again and
ONNX Runtime checks every name. :class:`CacheBindings` binds the caches once and rebinds only the
per-run inputs.

Contract
--------
- The cache arrays are bound by reference, not copied (a CPU ``OrtValue`` made from a numpy array
  reads that array's memory); the object keeps them alive. It serves exactly the dictionary object
  it was built from, for the runner that built it (:meth:`serves`): whoever replaces or writes a
  key's cache arrays makes new bindings (the engine does, on ``update_cache`` and re-prime;
  dropping or evicting a key frees its bindings with its entry).
- Per-run inputs are bound in place for the duration of a call and rebound by the next one;
  outputs are bound anew on every call (ONNX Runtime allocates them), so a returned array is never
  written by a later run.
- ONNX Runtime's ``IOBinding`` must not be used by two runs at once. :meth:`run` takes a binding
  from a free list for the duration of the call (creating one, with the caches bound, when every
  binding is in use), so concurrent runs on one key never share one; there are at most as many as
  the key ever had concurrent runs. A binding whose run raised is dropped, not reused.
- Results equal ``session.run`` on the same feeds: the same session runs the same values.
- bfloat16 arrays (half-precision caches, ``ml_dtypes.bfloat16``), which ONNX Runtime's numpy
  conversion does not know, are bound as their 16-bit patterns typed bfloat16 (:func:`ort_value`,
  still without a copy) and returned through :func:`to_numpy`.
"""

from __future__ import annotations

import ctypes
import math
import threading
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def ort_value(array: np.ndarray) -> Any:
    """A CPU ``OrtValue`` reading ``array``'s memory (C-contiguous; kept alive by the value)."""
    import onnxruntime as ort

    if array.dtype == BFLOAT16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint16), _ONNX_BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(array)


def to_numpy(value: Any) -> np.ndarray:
    """An output ``OrtValue`` as a numpy array (a bfloat16 one copied out as ``ml_dtypes.bfloat16``)."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    shape = tuple(value.shape())
    count = math.prod(shape)
    bits = np.empty(count, np.uint16)
    if count:
        ctypes.memmove(bits.ctypes.data, value.data_ptr(), 2 * count)
    return bits.view(BFLOAT16).reshape(shape)


class CacheBindings:
    """IOBindings of one session with one key's cache arrays bound, one per concurrent run."""

    def __init__(self, session: Any, caches: Mapping[str, np.ndarray], *, owner: object = None) -> None:
        self._session = session
        self._caches = caches
        self._owner = owner  # the runner that made them: a replaced runner must not reuse them
        wanted = {i.name for i in session.get_inputs()}
        # The OrtValues share the arrays' memory and hold references to them (no copy).
        self._values = {name: ort_value(array) for name, array in caches.items() if name in wanted}
        self._inputs = wanted - set(self._values)  # names bound anew by every run
        self._free: list[Any] = []
        self._in_use = 0
        self._lock = threading.Lock()

    def serves(self, owner: object, caches: Mapping[str, np.ndarray]) -> bool:
        """True if ``owner`` made these bindings for this very ``caches`` dictionary."""
        return self._owner is owner and self._caches is caches

    @property
    def count(self) -> int:
        """Bindings that exist, in use or free (for tests and diagnostics)."""
        with self._lock:
            return len(self._free) + self._in_use

    def run(self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]) -> list[np.ndarray]:
        """Run the session with the caches and ``feeds`` (the per-run inputs; others are ignored).

        Every per-run input of the graph must be in ``feeds``; the arrays must stay unchanged until
        the call returns (they are read in place).
        """
        missing = self._inputs - set(feeds)
        if missing:
            raise ValueError(f"inputs {sorted(missing)} are neither caches nor given")
        binding = self._take()
        try:
            for name in self._inputs:
                binding.bind_cpu_input(name, feeds[name])
            for name in output_names:  # a free binding has no outputs bound (cleared below)
                binding.bind_output(name, "cpu")
            self._session.run_with_iobinding(binding)
            # numpy() views the output's memory (kept alive by the array), as session.run returns it.
            outputs = [to_numpy(value) for value in binding.get_outputs()]
            binding.clear_binding_outputs()
        except BaseException:
            self._put_back(None)  # its state is unknown: drop it
            raise
        self._put_back(binding)
        return outputs

    def _take(self) -> Any:
        with self._lock:
            if self._free:
                self._in_use += 1
                return self._free.pop()
        binding = self._session.io_binding()
        for name, value in self._values.items():
            binding.bind_ortvalue_input(name, value)
        with self._lock:
            self._in_use += 1
        return binding

    def _put_back(self, binding: Any | None) -> None:
        with self._lock:
            self._in_use -= 1
            if binding is not None:
                self._free.append(binding)
