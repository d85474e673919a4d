"""The engine file, format version 1: one zip archive holding everything a compiled engine needs.

Members (all ZIP_STORED, so the weights can be memory-mapped):

- ``manifest.json``: the compiler's manifest plus ``members`` (size and sha256 of every other
  member) and ``weights`` (the index into weights.bin: name, dtype, shape, offset, nbytes).
- ``graphs/full.onnx``, ``graphs/sparse.onnx``, ``graphs/dense.onnx``: serialized
  ``onnx.ModelProto`` without initializers (the weights are stored once, in weights.bin).
- ``weights.bin``: every weight array, little-endian, C order, each at a 64-byte aligned offset
  (the writer also aligns the member's data in the file). Weights that are views of the same bytes
  (a convolution's weights and their reshape as a GEMM matrix) share one span: their index entries
  have the same offset, nbytes and dtype; any other overlap is rejected.
- ``blobs/<name>``: backend data, e.g. ``blobs/tensorrt/sparse_fp16.plan``.

Reading never executes code from the file: it parses JSON, protobuf and raw array bytes only.
``manifest.json`` is guarded by its zip CRC-32, every other member by the sha256 in the manifest.
Checksums are no signature (whoever crafts a file can recompute them), so the contents are
validated as untrusted: every manifest number is bounded (``sigec.core.manifest_schema``) and every
graph must be self-contained, with no external data and no unknown operator domain
(``sigec.core.graph_checks``); writing applies the same checks.
Every problem found while reading raises ``EngineFileError`` naming the file and the member or field.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import mmap as mmap_module
import os
import pathlib
import secrets
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import onnx
from google.protobuf.message import Error as ProtobufError

from sigec.core import VERSION
from sigec.core.errors import EngineFileError
from sigec.core.graph_checks import model_problem
from sigec.core.manifest_schema import MAX_RANK, ManifestSchemaError, validate_manifest

FORMAT_NAME = "sigec-engine"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

MANIFEST_MEMBER = "manifest.json"
WEIGHTS_MEMBER = "weights.bin"
BLOB_PREFIX = "blobs/"
GRAPH_NAMES = ("full", "sparse", "dense")
GRAPH_MEMBERS = {name: f"graphs/{name}.onnx" for name in GRAPH_NAMES}
STORAGE_KEYS = ("members", "weights")

WEIGHT_ALIGNMENT = 64
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_WEIGHT_NDIM = MAX_RANK

# Little-endian dtypes a weight may have; the key is the name stored in the manifest.
WEIGHT_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool", "uint8", "int8", "uint16", "int16", "uint32", "int32",
        "uint64", "int64", "float16", "float32", "float64",
    )
}

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ZIP64_LOCAL_EXTRA_BYTES = 20
_PADDING_EXTRA_ID = 0xD935  # the extra-field id Android's apksigner uses for alignment padding
_FLAG_ENCRYPTED = 0x1
_FLAG_UTF8_NAME = 0x800


@dataclass
class EngineContents:
    """Everything an engine file holds; ``manifest`` excludes the storage entries 'members' and 'weights'."""

    manifest: dict[str, Any]
    graphs: dict[str, bytes]
    weights: dict[str, np.ndarray]
    blobs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class _Member:
    """Where a stored member's bytes lie in the archive file."""

    name: str
    offset: int
    size: int
    crc: int


# --------------------------------------------------------------------------------------------- writing


def write_engine(path: str | os.PathLike, contents: EngineContents) -> pathlib.Path:
    """Write ``contents`` to ``path`` atomically (a temporary file in the same folder, then a rename).

    The contents are validated first; a problem raises EngineFileError and leaves ``path`` untouched.
    """
    target = pathlib.Path(path)
    for part in ("graphs", "weights", "blobs"):
        if not isinstance(getattr(contents, part), Mapping):
            raise _write_error(target, f"{part} must be a dict, got {type(getattr(contents, part)).__name__}")
    manifest = _manifest_to_store(target, contents.manifest)
    graphs = _graphs_to_store(target, contents.graphs)
    weights = _weights_to_store(target, contents.weights)
    blobs = _blobs_to_store(target, contents.blobs)
    _atomic_write(target, lambda out: _write_archive(target, out, manifest, graphs, weights, blobs))
    return target


def _write_error(target: pathlib.Path, message: str) -> EngineFileError:
    return EngineFileError(f"cannot write engine file '{target}': {message}")


def _manifest_to_store(target: pathlib.Path, manifest: Any) -> dict[str, Any]:
    if not isinstance(manifest, Mapping):
        raise _write_error(target, f"manifest must be a dict, got {type(manifest).__name__}")
    for key in STORAGE_KEYS:
        if key in manifest:
            raise _write_error(target, f"manifest must not hold {key!r}: write_engine adds it")
    defaults = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "sigec_version": _sigec_version()}
    stored = {**defaults, **manifest}
    if stored["format"] != FORMAT_NAME or stored["format_version"] != FORMAT_VERSION:
        raise _write_error(
            target,
            f"manifest says format {stored['format']!r} version {stored['format_version']!r}; "
            f"this writer writes {FORMAT_NAME!r} version {FORMAT_VERSION}",
        )
    try:
        validate_manifest(stored)
        return json.loads(json.dumps(stored, allow_nan=False))
    except ManifestSchemaError as exc:
        raise _write_error(target, str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise _write_error(target, f"manifest is not JSON-serializable: {exc}") from None


def _graphs_to_store(target: pathlib.Path, graphs: Mapping[str, bytes]) -> dict[str, bytes]:
    missing = [name for name in GRAPH_NAMES if name not in graphs]
    unknown = sorted(str(name) for name in graphs if name not in GRAPH_NAMES)
    if missing or unknown:
        raise _write_error(target, f"graphs must be exactly {list(GRAPH_NAMES)} (missing {missing}, unknown {unknown})")
    stored = {}
    for name in GRAPH_NAMES:
        data = graphs[name]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _write_error(target, f"graph {name!r} must be serialized ModelProto bytes, got {type(data).__name__}")
        stored[name] = bytes(data)
        problem = _graph_problem(stored[name])
        if problem:
            raise _write_error(target, f"graph {name!r} {problem}")
    return stored


def _weights_to_store(target: pathlib.Path, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    stored = {}
    for name, value in weights.items():
        if not isinstance(name, str):
            raise _write_error(target, f"weight names must be strings, got {name!r}")
        array = np.asarray(value)
        dtype = WEIGHT_DTYPES.get(array.dtype.name)
        if dtype is None or array.dtype.kind not in "biuf":
            raise _write_error(
                target, f"weight {name!r} has dtype {array.dtype}; allowed: {', '.join(WEIGHT_DTYPES)}"
            )
        if array.ndim > MAX_WEIGHT_NDIM:
            raise _write_error(target, f"weight {name!r} has {array.ndim} dimensions (at most {MAX_WEIGHT_NDIM})")
        stored[name] = array.astype(dtype, order="C", copy=False)  # (ascontiguousarray would make 0-d arrays 1-d)
    return stored


def _blobs_to_store(target: pathlib.Path, blobs: Mapping[str, bytes]) -> dict[str, bytes]:
    stored = {}
    for name, data in blobs.items():
        problem = _member_name_problem(BLOB_PREFIX + name) if isinstance(name, str) else "is not a string"
        if problem:
            raise _write_error(target, f"blob name {name!r} {problem}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _write_error(target, f"blob {name!r} must be bytes, got {type(data).__name__}")
        stored[name] = bytes(data)
    return stored


def _fingerprint(array: np.ndarray) -> tuple[int, str, bytes]:
    """Size, dtype and up to 4 KiB sampled evenly from the bytes: equal for equal arrays, and for
    different weights almost never, so full comparisons run only for likely copies."""
    flat = array.reshape(-1).view(np.uint8)
    return array.nbytes, array.dtype.name, flat[:: max(1, flat.size // 4096)][:4096].tobytes()


def _weights_index(weights: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Offsets into weights.bin; arrays of the same bytes (a weight and its reshaped view) share one span."""
    index, cursor = [], 0
    stored: dict[tuple[int, str, bytes], list[tuple[np.ndarray, int]]] = {}  # fingerprint -> (array, offset)
    for name, array in weights.items():
        candidates = stored.setdefault(_fingerprint(array), [])
        shared = next((offset for other, offset in candidates
                       if array.nbytes and np.array_equal(array.reshape(-1).view(np.uint8),
                                                          other.reshape(-1).view(np.uint8))), None)
        offset = shared if shared is not None else _align(cursor, WEIGHT_ALIGNMENT)
        index.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "offset": offset,
                      "nbytes": array.nbytes})
        if shared is None:
            candidates.append((array, offset))
            cursor = offset + array.nbytes
    return index


def _weights_chunks(weights: Mapping[str, np.ndarray], index: list[dict[str, Any]]) -> Iterator[memoryview]:
    cursor = 0
    for entry in index:
        if entry["offset"] < cursor:  # a view of bytes already written
            continue
        if entry["offset"] > cursor:
            yield memoryview(bytes(entry["offset"] - cursor))
        yield memoryview(weights[entry["name"]].reshape(-1).view(np.uint8))
        cursor = entry["offset"] + entry["nbytes"]


def _write_archive(
    target: pathlib.Path,
    out: BinaryIO,
    manifest: dict[str, Any],
    graphs: Mapping[str, bytes],
    weights: Mapping[str, np.ndarray],
    blobs: Mapping[str, bytes],
) -> None:
    index = _weights_index(weights)
    weights_size = max((e["offset"] + e["nbytes"] for e in index), default=0)
    members: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name in GRAPH_NAMES:
            data = graphs[name]
            members[GRAPH_MEMBERS[name]] = _write_member(archive, out, GRAPH_MEMBERS[name], [data], len(data))
        members[WEIGHTS_MEMBER] = _write_member(
            archive, out, WEIGHTS_MEMBER, _weights_chunks(weights, index), weights_size, align=WEIGHT_ALIGNMENT
        )
        for name, data in blobs.items():
            members[BLOB_PREFIX + name] = _write_member(archive, out, BLOB_PREFIX + name, [data], len(data))
        stored = {**manifest, "weights": index, "members": members}
        try:
            validate_manifest(stored, stored=True)
        except ManifestSchemaError as exc:
            raise _write_error(target, str(exc)) from None
        text = json.dumps(stored, indent=1, allow_nan=False).encode("utf-8")
        if len(text) > MAX_MANIFEST_BYTES:
            raise _write_error(target, f"manifest.json would be {len(text)} bytes (at most {MAX_MANIFEST_BYTES})")
        _write_member(archive, out, MANIFEST_MEMBER, [text], len(text))


def _write_member(
    archive: zipfile.ZipFile, out: BinaryIO, name: str, chunks: Iterable[bytes | memoryview], size: int, align: int = 1
) -> dict[str, Any]:
    """Store one member (its data at a multiple of ``align`` in the file); return its size and sha256."""
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    info.external_attr = 0o644 << 16
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # the same rule zipfile applies, made explicit
    if align > 1:
        info.extra = _padding_extra(out.tell(), name, zip64, align)
    digest, written = hashlib.sha256(), 0
    with archive.open(info, "w", force_zip64=zip64) as member:
        for chunk in chunks:
            member.write(chunk)
            digest.update(chunk)
            written += len(chunk)
    if written != size:
        raise AssertionError(f"member {name!r}: wrote {written} bytes, expected {size}")
    return {"size": size, "sha256": digest.hexdigest()}


def _padding_extra(header_offset: int, name: str, zip64: bool, align: int) -> bytes:
    """An extra field that makes the member's data start at a multiple of ``align``."""
    encoded = name.encode("ascii") if name.isascii() else name.encode("utf-8")
    data_start = header_offset + _LOCAL_HEADER.size + len(encoded) + 4 + (_ZIP64_LOCAL_EXTRA_BYTES if zip64 else 0)
    padding = -data_start % align
    return struct.pack("<HH", _PADDING_EXTRA_ID, padding) + bytes(padding)


def _atomic_write(target: pathlib.Path, write: Callable[[BinaryIO], None]) -> None:
    temporary = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise _write_error(target, exc.strerror or str(exc)) from exc
    try:
        with os.fdopen(descriptor, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(exc, OSError):
            raise _write_error(target, exc.strerror or str(exc)) from exc
        raise
    _fsync_directory(target.parent)


def _fsync_directory(directory: pathlib.Path) -> None:
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# --------------------------------------------------------------------------------------------- reading


def read_engine(
    path: str | os.PathLike, *, expected_backend: str | None = None, mmap: bool = True
) -> EngineContents:
    """Load and verify an engine file: every member's size and sha256, the manifest, the weight index, the graphs.

    With ``mmap=True`` the weights are read-only, zero-copy views of a memory map of the file (the
    engine file must not be modified in place while they live; ``write_engine`` replaces files, which
    is safe). With ``mmap=False`` they are writable arrays read into memory.
    Raises EngineFileError (and only that, for any content of the file) naming the file and the fault.
    """
    source = pathlib.Path(path)
    with _open_file(source) as handle:
        members = _scan_archive(source, handle)
        stored = _load_manifest(source, handle, members)
        manifest = _without_storage(stored)
        if expected_backend is not None and manifest["backend"] != expected_backend:
            raise _read_error(
                source, f"was compiled for backend {manifest['backend']!r}, expected {expected_backend!r}"
            )
        graphs = {}
        for name in GRAPH_NAMES:
            graphs[name] = _read_checked(source, handle, members[GRAPH_MEMBERS[name]], stored)
            problem = _graph_problem(graphs[name])
            if problem:
                raise _read_error(source, f"member {GRAPH_MEMBERS[name]!r}: graph {name!r} {problem}")
        blobs = {
            name[len(BLOB_PREFIX):]: _read_checked(source, handle, member, stored)
            for name, member in members.items()
            if name.startswith(BLOB_PREFIX)
        }
        weights = _read_weights(source, handle, members[WEIGHTS_MEMBER], stored, use_mmap=mmap)
    return EngineContents(manifest=manifest, graphs=graphs, weights=weights, blobs=blobs)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate only the manifest (no checksums of the other members): cheap, for ``sigec inspect``.

    Returns the same dict as ``read_engine(path).manifest``; raises EngineFileError like read_engine.
    """
    source = pathlib.Path(path)
    with _open_file(source) as handle:
        members = _scan_archive(source, handle)
        return _without_storage(_load_manifest(source, handle, members))


def _read_error(source: pathlib.Path, message: str) -> EngineFileError:
    return EngineFileError(f"engine file '{source}': {message}")


def _without_storage(stored: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in stored.items() if key not in STORAGE_KEYS}


@contextlib.contextmanager
def _open_file(source: pathlib.Path) -> Iterator[BinaryIO]:
    try:
        handle = open(source, "rb")
    except OSError as exc:
        raise _read_error(source, f"cannot be opened: {exc.strerror or exc}") from exc
    with handle:
        yield handle


def _scan_archive(source: pathlib.Path, handle: BinaryIO) -> dict[str, _Member]:
    """Parse the zip directory and every local header; return the members by name."""
    try:
        with zipfile.ZipFile(handle) as archive:
            infos = archive.infolist()
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types on corrupt input
        raise _read_error(source, f"is not a valid zip archive (truncated or corrupted): {exc}") from None
    file_size = os.fstat(handle.fileno()).st_size
    members: dict[str, _Member] = {}
    for info in infos:
        name = info.orig_filename
        problem = _member_name_problem(name)
        if problem:
            shown = repr(name) if len(name) <= 200 else f"{name[:200]!r}..."
            raise _read_error(source, f"member name {shown} {problem}")
        if name in members:
            raise _read_error(source, f"duplicate member name {name!r}")
        members[name] = _locate_member(source, handle, info, file_size)
    return members


def _locate_member(source: pathlib.Path, handle: BinaryIO, info: zipfile.ZipInfo, file_size: int) -> _Member:
    name = info.orig_filename
    if info.flag_bits & _FLAG_ENCRYPTED:
        raise _read_error(source, f"member {name!r} is encrypted")
    if info.compress_type != zipfile.ZIP_STORED:
        method = info.compress_type
        raise _read_error(source, f"member {name!r} is compressed (method {method}); members must be stored")
    if info.compress_size != info.file_size:
        raise _read_error(
            source, f"member {name!r}: stored size {info.compress_size} differs from its size {info.file_size}"
        )
    if info.file_size > file_size:
        raise _read_error(
            source, f"member {name!r} declares {info.file_size} bytes, more than the archive's {file_size}"
        )
    if not 0 <= info.header_offset < file_size:
        raise _read_error(source, f"member {name!r} has its local header outside the archive")
    handle.seek(info.header_offset)
    header = handle.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size or header[:4] != _LOCAL_SIGNATURE:
        raise _read_error(source, f"member {name!r} has no valid local header (truncated or corrupted)")
    fields = _LOCAL_HEADER.unpack(header)
    method, name_length, extra_length = fields[3], fields[9], fields[10]
    encoding = "utf-8" if info.flag_bits & _FLAG_UTF8_NAME else "cp437"
    if handle.read(name_length) != name.encode(encoding) or method != zipfile.ZIP_STORED:
        raise _read_error(source, f"member {name!r}: local header does not match the central directory")
    offset = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
    if offset + info.file_size > file_size:
        raise _read_error(source, f"member {name!r} ends past the end of the archive (truncated)")
    return _Member(name=name, offset=offset, size=info.file_size, crc=info.CRC)


def _load_manifest(source: pathlib.Path, handle: BinaryIO, members: Mapping[str, _Member]) -> dict[str, Any]:
    member = members.get(MANIFEST_MEMBER)
    if member is None:
        raise _read_error(source, f"missing member {MANIFEST_MEMBER!r}")
    if member.size > MAX_MANIFEST_BYTES:
        raise _read_error(
            source, f"{MANIFEST_MEMBER} is {member.size} bytes, over the limit of {MAX_MANIFEST_BYTES} bytes"
        )
    raw = _read_range(source, handle, member)
    if zlib.crc32(raw) != member.crc:
        raise _read_error(source, f"{MANIFEST_MEMBER} is corrupted (CRC-32 mismatch)")
    try:
        stored = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _read_error(source, f"{MANIFEST_MEMBER} is not valid JSON: {exc}") from None
    if not isinstance(stored, dict):
        raise _read_error(source, f"{MANIFEST_MEMBER} is not a JSON object")
    _check_format(source, stored)
    try:
        validate_manifest(stored, stored=True)
    except ManifestSchemaError as exc:
        raise _read_error(source, f"{MANIFEST_MEMBER} field {exc.field!r} {exc.problem}") from None
    _check_members(source, stored["members"], members)
    _check_weights_index(source, stored["weights"], stored["members"][WEIGHTS_MEMBER]["size"])
    return stored


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        duplicates = sorted({key for key, _ in pairs if sum(1 for other, _ in pairs if other == key) > 1})
        raise ValueError(f"duplicate keys {duplicates}")
    return result


def _reject_constant(constant: str) -> None:
    raise ValueError(f"{constant} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _check_format(source: pathlib.Path, stored: dict[str, Any]) -> None:
    name = stored.get("format")
    if name != FORMAT_NAME:
        raise _read_error(
            source, f"is not a sigec engine ({MANIFEST_MEMBER} field 'format' is {name!r}, expected {FORMAT_NAME!r})"
        )
    version = stored.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise _read_error(source, f"{MANIFEST_MEMBER} field 'format_version' must be an integer, got {version!r}")
    if version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)
        raise _read_error(
            source,
            f"engine format version {version} is not supported by sigec {_sigec_version()} (supports {supported})",
        )


def _check_members(source: pathlib.Path, listed: Mapping[str, Any], members: Mapping[str, _Member]) -> None:
    """The archive must hold exactly manifest.json plus the members the manifest lists, at the listed sizes."""
    for name in [*GRAPH_MEMBERS.values(), WEIGHTS_MEMBER]:
        if name not in listed:
            raise _read_error(source, f"{MANIFEST_MEMBER} field 'members' lacks {name!r}")
    for name in listed:
        is_blob = name.startswith(BLOB_PREFIX) and not _member_name_problem(name)
        if name not in GRAPH_MEMBERS.values() and name != WEIGHTS_MEMBER and not is_blob:
            raise _read_error(source, f"{MANIFEST_MEMBER} field 'members' lists an unknown member {name!r}")
    for name in members:
        if name != MANIFEST_MEMBER and name not in listed:
            raise _read_error(source, f"unexpected member {name!r}")
    for name, record in listed.items():
        if name not in members:
            raise _read_error(source, f"missing member {name!r}")
        if members[name].size != record["size"]:
            raise _read_error(
                source, f"member {name!r} size mismatch: {members[name].size} bytes, manifest says {record['size']}"
            )


def _check_weights_index(source: pathlib.Path, index: list[dict[str, Any]], weights_size: int) -> None:
    """Names unique, dtypes allowed, sizes consistent, aligned, in bounds and not overlapping."""
    seen: set[str] = set()
    spans = []
    for position, entry in enumerate(index):
        where = f"{MANIFEST_MEMBER} field 'weights[{position}]' ({entry['name']!r})"
        if entry["name"] in seen:
            raise _read_error(source, f"{where}: duplicate weight name")
        seen.add(entry["name"])
        dtype = WEIGHT_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise _read_error(source, f"{where}: dtype {entry['dtype']!r} is not allowed")
        shape = entry["shape"]
        if len(shape) > MAX_WEIGHT_NDIM or math.prod(max(d, 1) for d in shape) * dtype.itemsize > 2**62:
            raise _read_error(source, f"{where}: shape {shape} is absurd")
        if math.prod(shape) * dtype.itemsize != entry["nbytes"]:
            raise _read_error(
                source, f"{where}: shape {shape} of {entry['dtype']} needs {math.prod(shape) * dtype.itemsize} bytes, "
                f"nbytes says {entry['nbytes']}"
            )
        if entry["offset"] % WEIGHT_ALIGNMENT:
            raise _read_error(source, f"{where}: offset {entry['offset']} is not {WEIGHT_ALIGNMENT}-byte aligned")
        if entry["offset"] + entry["nbytes"] > weights_size:
            raise _read_error(
                source, f"{where}: bytes {entry['offset']}..{entry['offset'] + entry['nbytes']} are out of bounds "
                f"of {WEIGHTS_MEMBER} ({weights_size} bytes)"
            )
        if entry["nbytes"]:
            spans.append((entry["offset"], entry["offset"] + entry["nbytes"], entry["dtype"], entry["name"]))
    spans.sort()
    for (start0, end0, dtype0, first), (start, end, dtype, second) in zip(spans, spans[1:]):
        same_bytes = (start0, end0, dtype0) == (start, end, dtype)  # views of one array
        if start < end0 and not same_bytes:
            raise _read_error(source, f"{MANIFEST_MEMBER} field 'weights': weights {first!r} and {second!r} overlap")


def _read_range(source: pathlib.Path, handle: BinaryIO, member: _Member) -> bytes:
    handle.seek(member.offset)
    data = handle.read(member.size)
    if len(data) != member.size:
        raise _read_error(source, f"member {member.name!r} is truncated")
    return data


def _read_checked(source: pathlib.Path, handle: BinaryIO, member: _Member, stored: dict[str, Any]) -> bytes:
    data = _read_range(source, handle, member)
    _check_digest(source, member, data, stored)
    return data


def _check_digest(source: pathlib.Path, member: _Member, data: Any, stored: dict[str, Any]) -> None:
    if hashlib.sha256(data).hexdigest() != stored["members"][member.name]["sha256"]:
        raise _read_error(source, f"member {member.name!r} is corrupted (sha256 checksum mismatch)")


def _read_weights(
    source: pathlib.Path, handle: BinaryIO, member: _Member, stored: dict[str, Any], *, use_mmap: bool
) -> dict[str, np.ndarray]:
    if use_mmap:
        buffer: Any = mmap_module.mmap(handle.fileno(), 0, access=mmap_module.ACCESS_READ)
        base = member.offset
    else:
        buffer = bytearray(member.size)
        handle.seek(member.offset)
        if handle.readinto(buffer) != member.size:
            raise _read_error(source, f"member {member.name!r} is truncated")
        base = 0
    try:
        with memoryview(buffer) as view:
            _check_digest(source, member, view[base:base + member.size], stored)
        weights = {}
        for entry in stored["weights"]:
            dtype = WEIGHT_DTYPES[entry["dtype"]]
            count = entry["nbytes"] // dtype.itemsize
            if count:
                array = np.frombuffer(buffer, dtype=dtype, count=count, offset=base + entry["offset"])
            else:
                array = np.empty(0, dtype=dtype)
                array.flags.writeable = not use_mmap
            weights[entry["name"]] = array.reshape(tuple(entry["shape"]))
        return weights
    except BaseException:
        if use_mmap:
            with contextlib.suppress(BufferError):
                buffer.close()
        raise


# --------------------------------------------------------------------------------------------- shared


def _member_name_problem(name: str) -> str | None:
    """Why ``name`` may not be a member name (it could escape the archive or is malformed), or None."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if "\\" in name:
        return "contains a backslash"
    if ":" in name or any(ord(char) < 0x20 for char in name):
        return "contains a colon or a control character"
    if name.startswith("/"):
        return "is an absolute path"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "has an empty, '.' or '..' path component (escapes the archive)"
    return None


def _graph_problem(data: bytes) -> str | None:
    """Why ``data`` is not an acceptable engine graph, or None: unparsable, not self-contained or with
    unknown operator domains (``sigec.core.graph_checks``), or holding initializers."""
    try:
        model = onnx.ModelProto.FromString(data)
    except (ProtobufError, ValueError, RuntimeError, RecursionError) as exc:
        return f"is not a valid ONNX ModelProto: {exc or type(exc).__name__}"
    problem = model_problem(model)
    if problem:
        return problem
    if len(model.graph.initializer) or len(model.graph.sparse_initializer):
        return "holds initializers; engine graphs keep their weights in weights.bin"
    return None


def _align(offset: int, alignment: int) -> int:
    return -(-offset // alignment) * alignment


def _sigec_version() -> str:
    return VERSION
