"""The wire format shared by the server and the client (docs/serving.md).

Bodies are ``.npz`` archives (``np.savez``: a zip of ``.npy`` files, one per array, no pickles).
A request holds the engine's inputs by name, and for ``run`` optionally the pixel mask under
``MASK_NAME``; a response holds the engine's outputs by name, in the engine's output order.
Errors are JSON ``{"error": <SigecError subclass name>, "message": <text>}`` with the status of
``STATUS_OF_ERROR``; a client raises the named class again.
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Mapping
from typing import IO

import numpy as np

from sigec.core.errors import BackendError, CacheError, CompileError, EngineFileError, InputError, SigecError

NPZ_MEDIA_TYPE = "application/x-npz"
MASK_NAME = "__mask__"
REPLICA_HEADER = "X-Sigec-Replica"
PATH_HEADER = "X-Sigec-Path"
ENGINE_MS_HEADER = "X-Sigec-Engine-Ms"
SESSION_HEADER = "X-Sigec-Session"

ERRORS: dict[str, type[SigecError]] = {cls.__name__: cls for cls in (
    SigecError, CompileError, EngineFileError, InputError, CacheError, BackendError)}
STATUS_OF_ERROR: dict[type[SigecError], int] = {InputError: 400, CacheError: 404}
ERROR_OF_STATUS: dict[int, type[SigecError]] = {400: InputError, 404: CacheError, 413: InputError}


def status_of(exc: SigecError) -> int:
    """The HTTP status of an error: 400 bad input, 404 unknown or expired session, else 500."""
    for cls, status in STATUS_OF_ERROR.items():
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: SigecError) -> bytes:
    """The JSON error body naming the exception's class and message."""
    return json.dumps({"error": type(exc).__name__, "message": str(exc)}).encode()


def error_from_response(status: int, body: bytes) -> SigecError:
    """The exception a client raises for an error response (by the body's class name, else by status)."""
    try:
        payload = json.loads(body)
        name, message = str(payload["error"]), str(payload["message"])
    except (ValueError, KeyError, TypeError):
        name, message = "", body[:500].decode("utf-8", "replace") or f"HTTP {status}"
    cls = ERRORS.get(name) or ERROR_OF_STATUS.get(status) or (BackendError if status >= 500 else SigecError)
    return cls(message)


def encode_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An uncompressed ``.npz`` of ``arrays`` (insertion order kept)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: np.asarray(a) for name, a in arrays.items()})
    return buffer.getvalue()


def decode_arrays(body: bytes, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` body by name; anything malformed raises ``InputError``.

    ``max_bytes`` bounds the arrays' total size, checked from each ``.npy`` header before its data
    is read (so a small body cannot declare a huge array). Object arrays (pickles) are refused.
    """
    try:
        arrays = {}
        total = 0
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy"):
                    raise InputError(f"npz member {info.filename!r} is not a .npy file")
                with archive.open(info) as member:
                    shape, fortran_order, dtype = _read_npy_header(member)
                    nbytes = math.prod(shape) * dtype.itemsize
                    total += nbytes
                    if max_bytes is not None and total > max_bytes:
                        raise InputError(f"the request's arrays hold more than {max_bytes} bytes, more than this "
                                         f"engine's inputs can")
                    data = bytearray(member.read(nbytes))  # writable arrays, as a local engine returns
                if len(data) != nbytes:
                    raise InputError(f"npz member {info.filename!r} holds {len(data)} bytes of data, its header "
                                     f"declares {nbytes}")
                array = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
                arrays[info.filename[:-4]] = array
        return arrays
    except InputError:
        raise
    except Exception as exc:  # zipfile, numpy's header reader: many exception types for one cause
        raise InputError(f"the request body is not a valid .npz archive of arrays: {type(exc).__name__}: {exc}") from exc


def _read_npy_header(member: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of a ``.npy`` stream, positioned at its data afterwards."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise InputError(f".npy format version {version} is not supported")
    if dtype.hasobject:
        raise InputError("object arrays (pickles) are refused")
    return tuple(int(d) for d in shape), bool(fortran_order), dtype
