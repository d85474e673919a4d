"""The engine file (format version 1): round trip, memory mapping, atomic writes and every validation error."""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import mmap
import os
import pathlib
import struct
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from sigec.core import engine_file
from sigec.core.engine_file import (
    FORMAT_NAME,
    FORMAT_VERSION,
    EngineContents,
    read_engine,
    read_manifest,
    write_engine,
)
from sigec.core.errors import EngineFileError
from sigec.core.manifest_schema import ManifestSchemaError, validate_manifest

GRAPH_MEMBERS = ["graphs/full.onnx", "graphs/sparse.onnx", "graphs/dense.onnx"]
BLOB = "tensorrt/sparse_fp16.plan"


# --------------------------------------------------------------------------------------------- fixtures


def _graph(name: str, *, with_initializer: bool = False) -> bytes:
    node = helper.make_node("Conv", ["x", "conv.weight"], [f"{name}_y"])
    graph = helper.make_graph(
        [node],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4, 8, 8])],
    )
    if with_initializer:
        graph.initializer.append(numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "conv.weight"))
    return helper.make_model(graph).SerializeToString()


def _manifest() -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sigec_version": "0.1.0",
        "backend": "ort",
        "mode": "exact",
        "inputs": [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "float32", "spatial": True}],
        "outputs": [{"name": "y", "shape": [1, 4, 8, 8], "dtype": "float32"}],
        "caches": [
            {"name": "c0", "source": "conv_out", "shape": [1, 4, 8, 8], "dtype": "float32", "kind": "activation"}
        ],
        "resolutions": [{"name": "r8", "size": [8, 8], "tile": 4, "mask": "m1"}],
        "mask_program": {
            "input_size": [8, 8],
            "threshold": 0.05,
            "dilation": 1,
            "instructions": [
                {"op": "window", "out": "m0", "src": "input", "kernel": [2, 2], "stride": [1, 1],
                 "pads": [0, 0, 1, 1], "size": [8, 8]},
                {"op": "dilate", "out": "m1", "src": "m0", "radius": 1},
            ],
        },
        "updates": [{"output": "y", "cache": "c0", "resolution": "r8"}],
        "approximations": [{"node": "norm0", "kind": "frozen_stats"}],
        "nodes": [{"name": "conv0", "op_type": "Conv", "kind": "sparse", "block": [4, 4]}],
        "options": {"tile": 4, "dtype": "float32", "nested": {"a": [1, 2.5, None, "s"]}},
        "future_field": {"anything": True},
    }


def _weights() -> dict[str, np.ndarray]:
    odd_floats = np.array([np.nan, -0.0, 1e-45, np.inf], np.float32)
    odd_floats[0] = np.uint32(0x7FC0_0001).view(np.float32)  # a NaN with a payload
    return {
        "conv.weight": np.arange(12, dtype=np.float32).reshape(4, 3, 1, 1) / 7,
        "odd": odd_floats,
        "half": np.array([[0.5, 6e-8], [-2.0, 65504.0]], np.float16),
        "index": np.array([-(2**62), 0, 2**62 + 5], np.int64),
        "i32": np.array([1, -2, 3], np.int32),
        "flags": np.array([True, False, True]),
        "empty": np.zeros((0, 5), np.uint8),
        "scalar": np.array(3.25, np.float64),
    }


def _contents() -> EngineContents:
    return EngineContents(
        manifest=_manifest(),
        graphs={name: _graph(name) for name in ("full", "sparse", "dense")},
        weights=_weights(),
        blobs={BLOB: b"\x00plan\xffbytes" * 5, "ort/notes.txt": b""},
    )


@pytest.fixture
def engine_path(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_engine(tmp_path / "model.sigec", _contents())


def assert_same_contents(actual: EngineContents, expected: EngineContents) -> None:
    assert actual.manifest == expected.manifest
    assert actual.graphs == expected.graphs
    assert actual.blobs == expected.blobs
    assert list(actual.weights) == list(expected.weights)
    for name, array in expected.weights.items():
        loaded = actual.weights[name]
        assert loaded.dtype == array.dtype.newbyteorder("<"), name
        assert loaded.shape == array.shape, name
        assert loaded.flags.c_contiguous, name
        assert loaded.tobytes() == np.ascontiguousarray(array, array.dtype.newbyteorder("<")).tobytes(), name


# --------------------------------------------------------------------------------------------- archive surgery


def _members(path: pathlib.Path) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _stored_manifest(path: pathlib.Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("manifest.json"))


def _repack(
    path: pathlib.Path,
    *,
    replace: dict[str, bytes] | None = None,
    drop: tuple[str, ...] = (),
    add: list[tuple[str, bytes]] | None = None,
    edit_manifest: Callable[[dict[str, Any]], None] | None = None,
    manifest_bytes: bytes | None = None,
    fix_members: bool = True,
    compression: int = zipfile.ZIP_STORED,
) -> pathlib.Path:
    """Rewrite the archive at ``path`` with changes; by default re-list the sizes and hashes of changed members."""
    replace = replace or {}
    members = [(name, replace.get(name, data)) for name, data in _members(path) if name not in drop]
    members += add or []
    manifest = _stored_manifest(path)
    if fix_members:
        for name, data in members:
            if name in manifest["members"]:
                manifest["members"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if edit_manifest is not None:
        edit_manifest(manifest)
    text = manifest_bytes if manifest_bytes is not None else json.dumps(manifest).encode()
    members = [(name, text if name == "manifest.json" else data) for name, data in members]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests write on purpose
        with zipfile.ZipFile(path, "w", compression=compression) as archive:
            for name, data in members:
                archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return path


def _patch_central_sizes(path: pathlib.Path, member: str, size: int) -> None:
    """Set a member's compressed and uncompressed size in the central directory."""
    raw = bytearray(path.read_bytes())
    position = raw.find(b"PK\x01\x02")
    while position >= 0:
        name_length = struct.unpack_from("<H", raw, position + 28)[0]
        if raw[position + 46 : position + 46 + name_length] == member.encode():
            struct.pack_into("<LL", raw, position + 20, size, size)
            path.write_bytes(bytes(raw))
            return
        position = raw.find(b"PK\x01\x02", position + 4)
    raise AssertionError(f"{member} not in the central directory")


def _member_data_offset(path: pathlib.Path, member: str) -> int:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    raw = path.read_bytes()
    name_length, extra_length = struct.unpack_from("<HH", raw, info.header_offset + 26)
    return info.header_offset + 30 + name_length + extra_length


def _expect_error(path: pathlib.Path, *fragments: str, **kwargs: Any) -> str:
    with pytest.raises(EngineFileError) as caught:
        read_engine(path, **kwargs)
    message = str(caught.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


# --------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("use_mmap", [True, False])
def test_round_trip_is_bit_identical(engine_path: pathlib.Path, use_mmap: bool) -> None:
    loaded = read_engine(engine_path, mmap=use_mmap, expected_backend="ort")
    assert_same_contents(loaded, _contents())
    assert np.isnan(loaded.weights["odd"][0]) and loaded.weights["odd"].view(np.uint32)[0] == 0x7FC0_0001
    for name in ("full", "sparse", "dense"):
        assert onnx.ModelProto.FromString(loaded.graphs[name]).graph.name == name


def test_write_fills_format_fields_and_normalizes_layout(tmp_path: pathlib.Path) -> None:
    contents = _contents()
    for key in ("format", "format_version", "sigec_version"):
        del contents.manifest[key]
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    contents.weights = {"transposed": base.T, "big_endian": np.arange(5, dtype=">i4"), "strided": base[:, ::2]}
    loaded = read_engine(write_engine(tmp_path / "e.sigec", contents))
    filled = {"format": FORMAT_NAME, "format_version": 1, "sigec_version": "0.1.0"}
    assert loaded.manifest == {**contents.manifest, **filled}
    assert loaded.weights["big_endian"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(loaded.weights["big_endian"], np.arange(5))
    np.testing.assert_array_equal(loaded.weights["transposed"], base.T)
    np.testing.assert_array_equal(loaded.weights["strided"], base[:, ::2])
    assert all(array.flags.c_contiguous for array in loaded.weights.values())


def test_mmap_weights_are_read_only_aligned_views_of_the_file(engine_path: pathlib.Path) -> None:
    weights = read_engine(engine_path).weights
    for name, array in weights.items():
        assert not array.flags.writeable, name
        if array.size:
            assert array.ctypes.data % 64 == 0, name
            base = array
            while not isinstance(base, mmap.mmap):
                base = base.obj if isinstance(base, memoryview) else base.base
                assert base is not None, f"{name} is not a view of the memory map"
    with pytest.raises(ValueError):
        weights["conv.weight"][0, 0, 0, 0] = 1.0


def test_copied_weights_are_writable_and_independent(engine_path: pathlib.Path) -> None:
    weights = read_engine(engine_path, mmap=False).weights
    assert all(array.flags.writeable for array in weights.values())
    weights["conv.weight"][...] = 0.0
    np.testing.assert_array_equal(read_engine(engine_path).weights["conv.weight"], _weights()["conv.weight"])


def test_stored_layout(engine_path: pathlib.Path) -> None:
    stored = _stored_manifest(engine_path)
    with zipfile.ZipFile(engine_path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        assert set(infos) == {"manifest.json", *GRAPH_MEMBERS, "weights.bin", f"blobs/{BLOB}", "blobs/ort/notes.txt"}
        assert all(info.compress_type == zipfile.ZIP_STORED for info in infos.values())
        for name, record in stored["members"].items():
            data = archive.read(name)
            assert record == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert set(stored["members"]) == set(infos) - {"manifest.json"}
    assert [entry["name"] for entry in stored["weights"]] == list(_weights())
    assert all(entry["offset"] % 64 == 0 for entry in stored["weights"])
    assert _member_data_offset(engine_path, "weights.bin") % 64 == 0
    validate_manifest(stored, stored=True)


def test_empty_weights_and_blobs_round_trip(tmp_path: pathlib.Path) -> None:
    contents = _contents()
    contents.weights, contents.blobs = {}, {}
    for use_mmap in (True, False):
        assert_same_contents(read_engine(write_engine(tmp_path / "e.sigec", contents), mmap=use_mmap), contents)


def test_zip64_members_stay_aligned(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as patch:
        patch.setattr(zipfile, "ZIP64_LIMIT", 100)  # every member over ~95 bytes gets zip64 headers
        path = write_engine(tmp_path / "e.sigec", _contents())
    with zipfile.ZipFile(path) as archive:
        header_offset = archive.getinfo("weights.bin").header_offset
    raw = path.read_bytes()
    local_size, name_length, extra_length = struct.unpack_from("<LHH", raw, header_offset + 22)
    extra = raw[header_offset + 30 + name_length : header_offset + 30 + name_length + extra_length]
    assert local_size == 0xFFFF_FFFF and struct.unpack_from("<HH", extra, len(extra) - 20) == (1, 16)
    assert _member_data_offset(path, "weights.bin") % 64 == 0
    assert_same_contents(read_engine(path), _contents())


def test_write_is_deterministic(tmp_path: pathlib.Path) -> None:
    first = write_engine(tmp_path / "a.sigec", _contents()).read_bytes()
    assert write_engine(tmp_path / "b.sigec", _contents()).read_bytes() == first


def test_read_manifest_skips_checksums_but_validates(engine_path: pathlib.Path) -> None:
    raw = bytearray(engine_path.read_bytes())
    raw[_member_data_offset(engine_path, "weights.bin")] ^= 0xFF
    engine_path.write_bytes(bytes(raw))
    assert read_manifest(engine_path) == _contents().manifest
    _expect_error(engine_path, "'weights.bin' is corrupted (sha256")
    fresh = write_engine(engine_path.parent / "fresh.sigec", _contents())
    _repack(fresh, edit_manifest=lambda m: m.update(format_version=2))
    with pytest.raises(EngineFileError, match="engine format version 2 is not supported"):
        read_manifest(fresh)


# --------------------------------------------------------------------------------------------- atomic write


def test_failed_write_keeps_the_original_file(engine_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = engine_path.read_bytes()

    def failing_chunks(weights: Any, index: Any) -> Any:
        yield memoryview(b"\x01" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(engine_file, "_weights_chunks", failing_chunks)
    changed = _contents()
    changed.manifest["mode"] = "approx"
    with pytest.raises(EngineFileError, match="No space left on device") as caught:
        write_engine(engine_path, changed)
    assert str(engine_path) in str(caught.value)
    assert engine_path.read_bytes() == original
    assert os.listdir(engine_path.parent) == [engine_path.name]

    def interrupted_chunks(weights: Any, index: Any) -> Any:
        yield memoryview(b"\x01")
        raise KeyboardInterrupt

    monkeypatch.setattr(engine_file, "_weights_chunks", interrupted_chunks)
    with pytest.raises(KeyboardInterrupt):
        write_engine(engine_path.parent / "new.sigec", changed)
    assert os.listdir(engine_path.parent) == [engine_path.name]
    assert_same_contents(read_engine(engine_path), _contents())


def test_write_into_missing_folder_fails_cleanly(tmp_path: pathlib.Path) -> None:
    with pytest.raises(EngineFileError, match="cannot write engine file"):
        write_engine(tmp_path / "no" / "such" / "e.sigec", _contents())


def _bad_contents(change: Callable[[EngineContents], None]) -> EngineContents:
    contents = _contents()
    change(contents)
    return contents


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: setattr(c, "graphs", None), "graphs must be a dict"),
        (lambda c: c.graphs.pop("dense"), "graphs must be exactly"),
        (lambda c: c.graphs.update(extra=b""), "unknown ['extra']"),
        (lambda c: c.graphs.update(full=_graph("full", with_initializer=True)), "graph 'full' holds initializers"),
        (lambda c: c.graphs.update(sparse=b"\xff\xff\xff"), "graph 'sparse' is not a valid ONNX ModelProto"),
        (lambda c: c.weights.update(w=np.array([object()])), "weight 'w' has dtype object"),
        (lambda c: c.weights.update(w=np.zeros(2, np.complex64)), "weight 'w' has dtype complex64"),
        (lambda c: c.weights.update({3: np.zeros(2)}), "weight names must be strings"),
        (lambda c: c.manifest.update(members={}), "must not hold 'members'"),
        (lambda c: c.manifest.update(weights=[]), "must not hold 'weights'"),
        (lambda c: c.manifest.update(mode="fast"), "manifest field 'mode' must be one of"),
        (lambda c: c.manifest.update(format_version=2), "this writer writes 'sigec-engine' version 1"),
        (lambda c: c.manifest["options"].update(bad={1, 2}), "not JSON-serializable"),
        (lambda c: c.manifest["options"].update(bad=float("nan")), "not JSON-serializable"),
        (lambda c: c.blobs.update({"../escape": b""}), "blob name '../escape'"),
        (lambda c: c.blobs.update({"a\\b": b""}), "backslash"),
        (lambda c: c.blobs.update({"x": "text"}), "blob 'x' must be bytes"),
    ],
)
def test_write_rejects_bad_contents(
    tmp_path: pathlib.Path, change: Callable[[EngineContents], None], fragment: str
) -> None:
    with pytest.raises(EngineFileError) as caught:
        write_engine(tmp_path / "e.sigec", _bad_contents(change))
    assert fragment in str(caught.value)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------- container errors


def test_missing_file(tmp_path: pathlib.Path) -> None:
    _expect_error(tmp_path / "absent.sigec", "cannot be opened")


@pytest.mark.parametrize("data", [b"", b"hello, not a zip", b"PK\x05\x06" + bytes(10)])
def test_not_a_zip(tmp_path: pathlib.Path, data: bytes) -> None:
    path = tmp_path / "e.sigec"
    path.write_bytes(data)
    _expect_error(path, "is not a valid zip archive")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_file(engine_path: pathlib.Path, keep: float) -> None:
    raw = engine_path.read_bytes()
    engine_path.write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(EngineFileError, match="engine file"):
        read_engine(engine_path)
    with pytest.raises(EngineFileError):
        read_manifest(engine_path)


@pytest.mark.parametrize("member", [*GRAPH_MEMBERS, "weights.bin", f"blobs/{BLOB}", "manifest.json"])
def test_missing_member(engine_path: pathlib.Path, member: str) -> None:
    _repack(engine_path, drop=(member,))
    _expect_error(engine_path, f"missing member {member!r}")


@pytest.mark.parametrize("name", ["notes.txt", "blobs/unlisted.plan", "graphs/extra.onnx"])
def test_unexpected_member(engine_path: pathlib.Path, name: str) -> None:
    _repack(engine_path, add=[(name, b"x")])
    _expect_error(engine_path, f"unexpected member {name!r}")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("/etc/passwd", "is an absolute path"),
        ("../evil", "'..' path component"),
        ("blobs/../../evil", "'..' path component"),
        ("blobs//x", "empty, '.' or '..'"),
        ("graphs/", "empty, '.' or '..'"),
        ("./weights.bin", "empty, '.' or '..'"),
        ("blobs\\..\\evil", "backslash"),
        ("C:/evil", "colon"),
    ],
)
def test_member_name_escaping_the_archive(engine_path: pathlib.Path, name: str, fragment: str) -> None:
    _repack(engine_path, add=[(name, b"x")])
    _expect_error(engine_path, f"member name {name!r}", fragment)


def test_member_name_with_nul(engine_path: pathlib.Path) -> None:
    _repack(engine_path, add=[("blobs/aXb", b"x")])
    engine_path.write_bytes(engine_path.read_bytes().replace(b"blobs/aXb", b"blobs/a\x00b"))
    _expect_error(engine_path, "member name 'blobs/a\\x00b' contains a NUL byte")


def test_duplicate_member(engine_path: pathlib.Path) -> None:
    _repack(engine_path, add=[("graphs/full.onnx", _graph("full"))])
    _expect_error(engine_path, "duplicate member name 'graphs/full.onnx'")


def test_compressed_member(engine_path: pathlib.Path) -> None:
    _repack(engine_path, compression=zipfile.ZIP_DEFLATED)
    _expect_error(engine_path, "is compressed (method 8)")


def test_declared_size_beyond_the_archive(engine_path: pathlib.Path) -> None:
    _patch_central_sizes(engine_path, "weights.bin", 0x7FFF_FFFF)
    _expect_error(engine_path, "member 'weights.bin' declares 2147483647 bytes, more than the archive's")


@pytest.mark.parametrize("member", [*GRAPH_MEMBERS, "weights.bin", f"blobs/{BLOB}"])
def test_checksum_mismatch(engine_path: pathlib.Path, member: str) -> None:
    raw = bytearray(engine_path.read_bytes())
    raw[_member_data_offset(engine_path, member) + 3] ^= 0x40
    engine_path.write_bytes(bytes(raw))
    _expect_error(engine_path, f"member {member!r} is corrupted (sha256 checksum mismatch)")


def test_size_mismatch(engine_path: pathlib.Path) -> None:
    def grow(manifest: dict[str, Any]) -> None:
        manifest["members"]["graphs/dense.onnx"]["size"] += 1

    _repack(engine_path, edit_manifest=grow)
    _expect_error(engine_path, "member 'graphs/dense.onnx' size mismatch")


def test_manifest_corruption_is_caught_by_its_crc(engine_path: pathlib.Path) -> None:
    raw = bytearray(engine_path.read_bytes())
    offset = raw.find(b'"mode": "exact"', _member_data_offset(engine_path, "manifest.json"))
    raw[offset + len('"mode": "ex')] = ord("i")  # "exict": still valid JSON, still a string
    engine_path.write_bytes(bytes(raw))
    _expect_error(engine_path, "manifest.json is corrupted (CRC-32 mismatch)")


# --------------------------------------------------------------------------------------------- manifest errors


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (b"{not json", "manifest.json is not valid JSON"),
        (b"\xff\xfe{}", "manifest.json is not valid JSON"),
        (b'{"a": NaN}', "NaN is not allowed"),
        (b'{"a": 1e999}', "out of range"),
        (b'{"a": 1, "a": 2}', "duplicate keys ['a']"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, "manifest.json is not valid JSON", id="deeply-nested"),
        (b"[1, 2]", "manifest.json is not a JSON object"),
        (b'"text"', "manifest.json is not a JSON object"),
    ],
)
def test_manifest_not_json(engine_path: pathlib.Path, text: bytes, fragment: str) -> None:
    _repack(engine_path, manifest_bytes=text)
    _expect_error(engine_path, fragment)


def test_manifest_size_cap(engine_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert engine_file.MAX_MANIFEST_BYTES == 16 * 1024 * 1024
    monkeypatch.setattr(engine_file, "MAX_MANIFEST_BYTES", 256)
    _expect_error(engine_path, "manifest.json is", "over the limit of 256 bytes")


def test_wrong_format_name(engine_path: pathlib.Path) -> None:
    _repack(engine_path, edit_manifest=lambda m: m.update(format="other-engine"))
    _expect_error(engine_path, "is not a sigec engine", "'other-engine'")
    _repack(engine_path, edit_manifest=lambda m: m.pop("format"))
    _expect_error(engine_path, "is not a sigec engine")


@pytest.mark.parametrize("version", [2, 0, 99])
def test_unsupported_format_version(engine_path: pathlib.Path, version: int) -> None:
    _repack(engine_path, edit_manifest=lambda m: m.update(format_version=version))
    _expect_error(engine_path, f"engine format version {version} is not supported by sigec 0.1.0 (supports 1)")


@pytest.mark.parametrize("version", ["1", 1.0, True, None])
def test_format_version_of_wrong_type(engine_path: pathlib.Path, version: Any) -> None:
    _repack(engine_path, edit_manifest=lambda m: m.update(format_version=version))
    _expect_error(engine_path, "'format_version' must be an integer")


def test_expected_backend(engine_path: pathlib.Path) -> None:
    _expect_error(engine_path, "was compiled for backend 'ort', expected 'tensorrt'", expected_backend="tensorrt")
    assert read_engine(engine_path, expected_backend="ort").manifest["backend"] == "ort"


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets the manifest value at ``path`` (keys and list positions), or deletes it for ``...``."""

    def edit(manifest: dict[str, Any]) -> None:
        *parents, last = path
        target: Any = manifest
        for key in parents:
            target = target[key]
        if value is Ellipsis:
            del target[last]
        else:
            target[last] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_set(("mode",), "fast"), "manifest.json field 'mode' must be one of ['exact', 'approx'], got 'fast'"),
        (_set(("backend",), 3), "field 'backend' must be a string, got integer"),
        (_set(("caches",), ...), "field 'caches' is missing"),
        (_set(("inputs", 0, "shape", 1), "a"), "field 'inputs[0].shape[1]' must be an integer, got string"),
        (_set(("inputs", 0, "spatial"), 1), "field 'inputs[0].spatial' must be a boolean"),
        (_set(("outputs",), {}), "field 'outputs' must be a list, got object"),
        (_set(("resolutions", 0, "size"), [8]), "field 'resolutions[0].size' must have at least 2 elements"),
        (_set(("resolutions", 0, "tile"), 0), "field 'resolutions[0].tile' must be at least 1"),
        (
            _set(("mask_program", "threshold"), True),
            "field 'mask_program.threshold' must be a finite number, got boolean",
        ),
        (_set(("mask_program", "instructions", 1, "op"), ...), "field 'mask_program.instructions[1].op' is missing"),
        (_set(("updates", 0, "cache"), None), "field 'updates[0].cache' must be a string, got null"),
        (_set(("approximations",), [1]), "field 'approximations[0]' must be an object"),
        (_set(("options",), []), "field 'options' must be an object"),
        (_set(("options", "tile_size"), 0), "field 'options.tile_size' must be at least 1, got 0"),
        (_set(("options", "tile_size"), "4"), "field 'options.tile_size' must be an integer or an object, got string"),
        (_set(("options", "tile_size"), {"default": 4, "r8": 4096}), "'options.tile_size.r8' must be at most 1024, got 4096"),
        (_set(("nodes", 0, "kind"), ...), "field 'nodes[0].kind' is missing"),
        (
            _set(("members", "graphs/full.onnx", "sha256"), "abc"),
            "field \"members['graphs/full.onnx'].sha256\" must match",
        ),
        (_set(("members", "weights.bin"), ...), "field 'members' lacks 'weights.bin'"),
        (_set(("weights", 0, "offset"), -64), "field 'weights[0].offset' must be at least 0"),
        (_set(("weights",), ...), "field 'weights' is missing"),
    ],
)
def test_manifest_field_errors(
    engine_path: pathlib.Path, edit: Callable[[dict[str, Any]], None], fragment: str
) -> None:
    _repack(engine_path, edit_manifest=edit)
    _expect_error(engine_path, fragment)


def test_unknown_listed_member(engine_path: pathlib.Path) -> None:
    def list_unknown(manifest: dict[str, Any]) -> None:
        manifest["members"]["../x"] = {"size": 0, "sha256": "0" * 64}

    _repack(engine_path, edit_manifest=list_unknown)
    _expect_error(engine_path, "'members' lists an unknown member '../x'")


def test_unknown_top_level_fields_are_kept(engine_path: pathlib.Path) -> None:
    assert read_engine(engine_path).manifest["future_field"] == {"anything": True}


def _edit_weight(position: int, **changes: Any) -> Callable[[dict[str, Any]], None]:
    def edit(manifest: dict[str, Any]) -> None:
        manifest["weights"][position].update(changes)

    return edit


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (_edit_weight(1, offset=4096), "'weights[1]' ('odd'): bytes 4096..4112 are out of bounds of weights.bin"),
        (_edit_weight(1, offset=0), "weights 'odd' and 'conv.weight' overlap"),
        (_edit_weight(0, offset=8), "offset 8 is not 64-byte aligned"),
        (_edit_weight(0, dtype="object"), "dtype 'object' is not allowed"),
        (_edit_weight(0, dtype="float128"), "dtype 'float128' is not allowed"),
        (_edit_weight(0, dtype="O"), "dtype 'O' is not allowed"),
        (_edit_weight(0, shape=[4, 3, 1, 2]), "needs 96 bytes, nbytes says 48"),
        (_edit_weight(0, shape=[4, 3, 1, 1], nbytes=47), "needs 48 bytes, nbytes says 47"),
        (_edit_weight(6, shape=[0] + [2**31 - 1] * 3), "is absurd"),
        (_edit_weight(6, shape=[0] + [2**40] * 3), "'weights[6].shape[1]' must be at most 2147483647"),
        (_edit_weight(6, shape=[0] * 40), "'weights[6].shape' must have at most 32 elements"),
        (_edit_weight(1, name="conv.weight"), "duplicate weight name"),
    ],
)
def test_weight_index_errors(engine_path: pathlib.Path, edit: Callable[[dict[str, Any]], None], fragment: str) -> None:
    _repack(engine_path, edit_manifest=edit)
    _expect_error(engine_path, "manifest.json field 'weights", fragment)


def test_graph_that_is_not_onnx(engine_path: pathlib.Path) -> None:
    _repack(engine_path, replace={"graphs/sparse.onnx": b"\xff\xff\xff\xff"})
    _expect_error(engine_path, "member 'graphs/sparse.onnx': graph 'sparse' is not a valid ONNX ModelProto")


def test_graph_with_initializers(engine_path: pathlib.Path) -> None:
    _repack(engine_path, replace={"graphs/full.onnx": _graph("full", with_initializer=True)})
    _expect_error(engine_path, "graph 'full' holds initializers")


def test_repacked_archive_without_alignment_still_loads(engine_path: pathlib.Path) -> None:
    _repack(engine_path)
    assert_same_contents(read_engine(engine_path), _contents())
    assert_same_contents(read_engine(engine_path, mmap=False), _contents())


def test_schema_error_names_the_field() -> None:
    manifest = _manifest()
    manifest["nodes"] = "conv0"
    with pytest.raises(ManifestSchemaError) as caught:
        validate_manifest(manifest)
    assert caught.value.field == "nodes"
    assert isinstance(caught.value, EngineFileError)
    validate_manifest(_manifest())
    with pytest.raises(ManifestSchemaError, match="'members' is missing"):
        validate_manifest(_manifest(), stored=True)


# --------------------------------------------------------------------------------------------- property test


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, bytes]:
    folder = tmp_path_factory.mktemp("engines")
    return folder, write_engine(folder / "pristine.sigec", _contents()).read_bytes()


MEMBER_NAMES = ["manifest.json", *GRAPH_MEMBERS, "weights.bin", f"blobs/{BLOB}", "blobs/ort/notes.txt"]
NEW_NAMES = ["extra", "blobs/extra", "graphs/full.onnx", "weights.bin", "../up", "/abs", "a\\b", "graphs/", ""]
REPLACEMENTS: list[Any] = [None, True, 7, -1, 2.5, "text", [], {}, [1, "a"], {"k": 1}]

# Where a byte flip lands: anywhere, in the last 400 bytes (the central directory), or in manifest.json's data.
FLIP_REGIONS = st.sampled_from(["anywhere", "tail", "manifest"])
FLIP = st.tuples(FLIP_REGIONS, st.integers(0, 2**20), st.integers(1, 255))  # region, position, xor mask
FLIPS = st.tuples(st.just("flip"), st.lists(FLIP, min_size=1, max_size=4))
MUTATIONS = st.one_of(
    FLIPS,
    FLIPS,  # twice: flips are drawn twice as often as each other kind
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
    st.tuples(st.just("remove"), st.sampled_from(MEMBER_NAMES)),
    st.tuples(st.just("rename"), st.sampled_from(MEMBER_NAMES), st.sampled_from(NEW_NAMES)),
    st.tuples(st.just("add"), st.sampled_from(NEW_NAMES), st.binary(max_size=16)),
    st.tuples(st.just("retype"), st.integers(0, 2**20), st.sampled_from(REPLACEMENTS)),
)


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    paths = [prefix] if prefix else []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in children:
        paths += _json_paths(child, (*prefix, key))
    return paths


def _retyped(manifest: dict[str, Any], choice: int, replacement: Any) -> dict[str, Any]:
    changed = copy.deepcopy(manifest)
    paths = _json_paths(changed)
    *parents, last = paths[choice % len(paths)]
    target: Any = changed
    for key in parents:
        target = target[key]
    if type(target[last]) is type(replacement):
        replacement = [replacement]
    target[last] = replacement
    return changed


def _mutate(path: pathlib.Path, original: bytes, mutation: tuple[Any, ...]) -> dict[str, Any] | None:
    """Apply ``mutation`` to the engine file at ``path``; return the new manifest when the mutation rewrote it."""
    kind = mutation[0]
    if kind == "flip":
        raw = bytearray(original)
        manifest_start = _member_data_offset(path, "manifest.json")
        manifest_size = len(dict(_members(path))["manifest.json"])
        for region, position, mask in mutation[1]:
            if region == "tail":
                offset = len(raw) - 1 - position % min(len(raw), 400)
            elif region == "manifest":
                offset = manifest_start + position % manifest_size
            else:
                offset = position % len(raw)
            raw[offset] ^= mask
        path.write_bytes(bytes(raw))
    elif kind == "truncate":
        path.write_bytes(original[: mutation[1] % len(original)])
    elif kind == "remove":
        _repack(path, drop=(mutation[1],), fix_members=False)
    elif kind == "rename":
        members = _members(path)
        renamed = [(mutation[2] if name == mutation[1] else name, data) for name, data in members]
        _repack(path, drop=tuple(name for name, _ in members), add=renamed, fix_members=False)
    elif kind == "add":
        _repack(path, add=[(mutation[1], mutation[2])], fix_members=False)
    elif kind == "retype":
        changed = _retyped(_stored_manifest(path), mutation[1], mutation[2])
        _repack(path, manifest_bytes=json.dumps(changed).encode(), fix_members=False)
        return {key: value for key, value in changed.items() if key not in ("members", "weights")}
    return None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutation=MUTATIONS, use_mmap=st.booleans())
def test_mutated_files_load_intact_or_raise_engine_file_error(
    pristine: tuple[pathlib.Path, bytes], mutation: tuple[Any, ...], use_mmap: bool
) -> None:
    folder, original = pristine
    path = folder / f"mutated-{os.getpid()}-{id(mutation)}.sigec"
    path.write_bytes(original)
    try:
        new_manifest = _mutate(path, original, mutation)
        expected = _contents()
        if new_manifest is not None:
            expected.manifest = new_manifest
        try:
            loaded = read_engine(path, mmap=use_mmap)
        except EngineFileError as exc:
            assert str(path) in str(exc)
            loaded = None
        if loaded is not None:
            assert_same_contents(loaded, expected)
        try:
            manifest = read_manifest(path)
        except EngineFileError:
            assert loaded is None
        else:
            if loaded is not None:
                assert manifest == loaded.manifest
    finally:
        path.unlink()
