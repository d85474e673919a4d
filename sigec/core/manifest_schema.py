"""The engine manifest's schema, as plain data, its bounds, and a small validator for it.

The schema language is a tiny subset of JSON Schema, so the same data could be fed to ``jsonschema``:
``type`` (string, integer, number, boolean, array, object), ``enum``, ``minimum``, ``maximum``,
``pattern``, ``items``, ``minItems``, ``maxItems``, ``properties``, ``required``,
``additionalProperties`` (a schema for the values of unlisted keys; unlisted keys are allowed by
default) and ``anyOf`` (schemas of different types: the value must match the one of its type).

A manifest may come from a crafted file, so every number in it has a lower and an upper bound (the
``MAX_*`` constants below), and :func:`check_limits` enforces what no single field can: the size of
every tensor the manifest describes, the consistency of the mask program (each mask it reads is
defined, with the size the instruction expects) and the work and memory one run of it costs. With
these, nothing a manifest says makes loading or running allocate absurd memory or loop for ages;
a value beyond them raises ManifestSchemaError naming the field.

To add a manifest field, add one entry to ``MANIFEST_FIELDS`` (required) or ``OPTIONAL_FIELDS``
(validated when present); the storage fields that ``sigec.core.engine_file`` writes itself live in
``STORAGE_FIELDS``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from sigec.core.errors import EngineFileError
from sigec.core.options import BACKENDS, CACHE_DTYPES, MODES, NORM_STATS

Schema = Mapping[str, Any]

# Bounds of manifest numbers: far beyond any real engine, small enough that no value (nor, through
# check_limits, any combination of values) makes loading or running allocate absurd memory.
MAX_RANK = 32  # dimensions of a tensor
MAX_DIM = 2**31 - 1  # one dimension of a tensor
MAX_TENSOR_BYTES = 2**36  # one input, output or cache (64 GiB), also padded to whole tiles
MAX_BYTES = 2**48  # a member's size, a weight's offset or size (also checked against the archive)
MAX_BATCH = 4096
MAX_SPATIAL = 2**16  # a side, kernel, stride, pad, dilation, factor or radius in pixels
MAX_TILE = 1024  # a tile's side in pixels (real engines use 4 to 64)
MAX_MASK_CELLS = 2**33  # mask cells one run of the mask program allocates plus visits (see check_limits)
MAX_MACS = 2**62  # multiply-accumulates of one node
MAX_THRESHOLD = 3.4028234663852886e38  # float32's largest value: spatial inputs are float32 or float16
MAX_FALLBACK_FRACTION = 1000.0  # a fraction of the dense MACs; above 1 means "never fall back"
MAX_SMALL = 1000  # format version, opset, compute capability parts

# Bytes per element of every dtype name a tensor may have: numpy's names of the ONNX tensor types.
TENSOR_DTYPES: dict[str, int] = {
    "bool": 1, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "uint64": 8, "int64": 8,
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16,
    "object": 8,  # ONNX strings
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1,
    "float6_e2m3fn": 1, "float6_e3m2fn": 1, "float4_e2m1fn": 1, "int4": 1, "uint4": 1, "int2": 1, "uint2": 1,
}

STRING: Schema = {"type": "string"}
BOOLEAN: Schema = {"type": "boolean"}
ANY_OBJECT: Schema = {"type": "object"}
SHA256_HEX: Schema = {"type": "string", "pattern": "[0-9a-f]{64}"}


def integer(minimum: int, maximum: int) -> Schema:
    """An integer in ``[minimum, maximum]``."""
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def number(minimum: float, maximum: float) -> Schema:
    """A finite number (integer or float) in ``[minimum, maximum]``."""
    return {"type": "number", "minimum": minimum, "maximum": maximum}


def one_of(*choices: str) -> Schema:
    """A string that must be one of ``choices``."""
    return {"type": "string", "enum": list(choices)}


def array_of(items: Schema, *, length: int | None = None, min_length: int = 0,
             max_length: int | None = None) -> Schema:
    """A list whose elements all match ``items`` (of exactly ``length`` elements when given)."""
    schema: dict[str, Any] = {"type": "array", "items": items}
    if length is not None:
        min_length = max_length = length
    if min_length:
        schema["minItems"] = min_length
    if max_length is not None:
        schema["maxItems"] = max_length
    return schema


def record(**fields: Schema) -> Schema:
    """An object that must hold every one of ``fields``; other keys are allowed and not checked."""
    return {"type": "object", "properties": dict(fields), "required": list(fields)}


def with_optional(schema: Schema, **fields: Schema) -> Schema:
    """``schema`` (an object) that also checks ``fields`` when they are present."""
    return {**schema, "properties": {**schema.get("properties", {}), **fields}}


SHAPE = array_of(integer(0, MAX_DIM), max_length=MAX_RANK)
DTYPE = one_of(*TENSOR_DTYPES)
BYTES = integer(0, MAX_BYTES)
MACS = integer(0, MAX_MACS)
TILE = integer(1, MAX_TILE)
SIZE_2D = array_of(integer(1, MAX_SPATIAL), length=2)  # [height, width] of a mask
PAIR = array_of(integer(1, MAX_SPATIAL), length=2)  # kernel, stride, dilation or factor per axis
PADS = array_of(integer(0, MAX_SPATIAL), length=4)  # [top, left, bottom, right]
RADIUS = integer(0, MAX_SPATIAL)

# The fields of each mask instruction, by op (see sigec.core.mask_program); checked by check_limits.
MASK_INSTRUCTIONS: dict[str, Schema] = {
    "empty": record(out=STRING, size=SIZE_2D),
    "window": with_optional(record(out=STRING, src=STRING, kernel=PAIR, stride=PAIR, pads=PADS, size=SIZE_2D),
                            dilation=PAIR),
    "transpose_window": record(out=STRING, src=STRING, kernel=PAIR, stride=PAIR, pads=PADS, size=SIZE_2D),
    "upsample": record(out=STRING, src=STRING, factor=PAIR, size=SIZE_2D),
    "dilate": record(out=STRING, src=STRING, radius=RADIUS),
    "resample": record(out=STRING, src=STRING, size=SIZE_2D),
    "union": record(out=STRING, srcs=array_of(STRING, min_length=1)),
}
INPUT_MASK = "input"  # the pixel mask's name in the mask program

# The compiler's manifest: one entry per top-level field.
MANIFEST_FIELDS: dict[str, Schema] = {
    "format": STRING,
    "format_version": integer(0, MAX_SMALL),
    "sigec_version": STRING,
    "backend": one_of(*BACKENDS),
    "mode": one_of(*MODES),
    "inputs": array_of(record(name=STRING, shape=SHAPE, dtype=DTYPE, spatial=BOOLEAN)),
    "outputs": array_of(record(name=STRING, shape=SHAPE, dtype=DTYPE)),
    # dtype: as stored (float16/bfloat16 for half caches, passes/half_caches.py); source: the FULL output
    # holding it; origin (half caches): the model tensor it caches
    "caches": array_of(with_optional(record(name=STRING, source=STRING, shape=SHAPE, dtype=DTYPE, kind=STRING),
                                     origin=STRING)),
    # shared_batch: every batch item gets the union of the items' tiles (batched attention)
    "resolutions": array_of(with_optional(record(name=STRING, size=SIZE_2D, tile=TILE, mask=STRING),
                                          shared_batch=BOOLEAN)),
    "mask_program": record(
        input_size=SIZE_2D,
        threshold=number(0, MAX_THRESHOLD),
        dilation=RADIUS,
        instructions=array_of(record(op=one_of(*MASK_INSTRUCTIONS))),
    ),
    # whole: the output is the cache's new full value (token caches), else its active tiles
    "updates": array_of(with_optional(record(output=STRING, cache=STRING, resolution=STRING), whole=BOOLEAN)),
    "approximations": array_of(ANY_OBJECT),  # descriptions for people: no number in them is used
    "nodes": array_of(
        with_optional(
            record(kind=STRING),  # (the compiler leaves out empty fields, an unnamed node's name too)
            name=STRING, op_type=STRING, resolution=STRING, tile=TILE,
            window=array_of(integer(0, MAX_DIM), max_length=MAX_RANK),
            dense_macs=MACS, macs_per_tile=MACS, note=STRING,
        )
    ),
    "options": with_optional(
        ANY_OBJECT,
        tile_size={"anyOf": [TILE, {"type": "object", "additionalProperties": TILE}]},
        fallback=STRING,
        approx_dilation=RADIUS,
        dense_fallback_fraction=number(0, MAX_FALLBACK_FRACTION),
        opset=integer(1, MAX_SMALL),
        dense_resolutions=array_of(STRING),
        norm_stats=one_of(*NORM_STATS),
        cache_dtype=one_of(*CACHE_DTYPES),
        autotune=ANY_OBJECT,  # a record of measurements for people: no number in it is used
    ),
}

# What the engine file adds when it stores the manifest (see sigec.core.engine_file).
STORAGE_FIELDS: dict[str, Schema] = {
    "members": {"type": "object", "additionalProperties": record(size=BYTES, sha256=SHA256_HEX)},
    "weights": array_of(record(name=STRING, dtype=STRING, shape=SHAPE, offset=BYTES, nbytes=BYTES)),
}

PROFILE = record(input=STRING, min=SHAPE, opt=SHAPE, max=SHAPE)

# Optional sections: validated when present.
OPTIONAL_FIELDS: dict[str, Schema] = {
    # The batch of the spatial inputs (the runtime assumes 1 when absent).
    "batch": integer(1, MAX_BATCH),
    # TensorRT plans stored as blobs (sigec.passes.tensorrt_build).
    "tensorrt": record(
        tensorrt_version=STRING,
        device=record(name=STRING, compute_capability=array_of(integer(0, MAX_SMALL), length=2)),
        precisions=array_of(one_of("fp32", "fp16"), min_length=1),
        plugin_namespace=STRING,
        plans=array_of(record(graph=one_of("full", "sparse", "dense"), precision=one_of("fp32", "fp16"),
                              blob={"type": "string", "pattern": "tensorrt/[a-z]+_fp(32|16)\\.plan"},
                              bytes=integer(1, MAX_BYTES), sha256=SHA256_HEX, profiles=array_of(PROFILE)),
                       min_length=1),
    ),
}


MANIFEST_SCHEMA: Schema = with_optional(record(**MANIFEST_FIELDS), **OPTIONAL_FIELDS)
STORED_MANIFEST_SCHEMA: Schema = with_optional(record(**MANIFEST_FIELDS, **STORAGE_FIELDS), **OPTIONAL_FIELDS)


class ManifestSchemaError(EngineFileError):
    """A manifest value does not match the schema; ``field`` is its path, e.g. ``inputs[0].shape``."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"manifest field {field!r} {problem}" if field else f"manifest {problem}")


def validate_manifest(manifest: Any, *, stored: bool = False) -> None:
    """Check ``manifest`` against the compiler's schema (plus the storage fields when ``stored``) and
    the limits across fields (:func:`check_limits`).

    Raises ManifestSchemaError naming the first field at fault.
    """
    validate(manifest, STORED_MANIFEST_SCHEMA if stored else MANIFEST_SCHEMA)
    check_limits(manifest)


def validate(value: Any, schema: Schema, field: str = "") -> None:
    """Check ``value`` against ``schema`` (the subset described in the module docstring)."""
    kind = schema.get("type")
    if kind is not None and not _TYPE_CHECKS[kind](value):
        raise ManifestSchemaError(field, f"must be {_TYPE_NAMES[kind]}, got {_describe(value)}")
    if "anyOf" in schema:
        _validate_any_of(value, schema["anyOf"], field)
    if "enum" in schema and value not in schema["enum"]:
        raise ManifestSchemaError(field, f"must be one of {schema['enum']}, got {value!r}")
    if "minimum" in schema and value < schema["minimum"]:
        raise ManifestSchemaError(field, f"must be at least {schema['minimum']}, got {value!r}")
    if "maximum" in schema and value > schema["maximum"]:
        raise ManifestSchemaError(field, f"must be at most {schema['maximum']}, got {value!r}")
    if "pattern" in schema and not re.fullmatch(schema["pattern"], value):
        raise ManifestSchemaError(field, f"must match {schema['pattern']!r}, got {value!r}")
    if isinstance(value, list):
        _validate_array(value, schema, field)
    elif isinstance(value, dict):
        _validate_object(value, schema, field)


def _validate_any_of(value: Any, choices: Sequence[Schema], field: str) -> None:
    """Check ``value`` against the first choice of its type (so errors name the precise field)."""
    for choice in choices:
        if _TYPE_CHECKS[choice["type"]](value):
            validate(value, choice, field)
            return
    kinds = " or ".join(_TYPE_NAMES[choice["type"]] for choice in choices)
    raise ManifestSchemaError(field, f"must be {kinds}, got {_describe(value)}")


def _validate_array(value: list[Any], schema: Schema, field: str) -> None:
    if "minItems" in schema and len(value) < schema["minItems"]:
        raise ManifestSchemaError(field, f"must have at least {schema['minItems']} elements, got {len(value)}")
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        raise ManifestSchemaError(field, f"must have at most {schema['maxItems']} elements, got {len(value)}")
    if "items" in schema:
        for position, element in enumerate(value):
            validate(element, schema["items"], f"{field}[{position}]")


def _validate_object(value: dict[str, Any], schema: Schema, field: str) -> None:
    for key in schema.get("required", ()):
        if key not in value:
            raise ManifestSchemaError(_join(field, key), "is missing")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, element in value.items():
        if key in properties:
            validate(element, properties[key], _join(field, key))
        elif extra is False:
            raise ManifestSchemaError(_join(field, key), "is not allowed")
        elif isinstance(extra, Mapping):
            validate(element, extra, _join(field, key))


def _join(field: str, key: str) -> str:
    if key.isidentifier():
        return f"{field}.{key}" if field else key
    return f"{field}[{key!r}]"


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_integer(value)


_TYPE_CHECKS = {
    "string": lambda value: isinstance(value, str),
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda value: isinstance(value, bool),
    "array": lambda value: isinstance(value, list),
    "object": lambda value: isinstance(value, dict),
}

_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a finite number",
    "boolean": "a boolean",
    "array": "a list",
    "object": "an object",
}

_JSON_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "list", dict: "object"}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return _JSON_NAMES.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------- limits across fields


def check_limits(manifest: Mapping[str, Any]) -> None:
    """Check what no single field can express; ``manifest`` already matches the schema.

    - every input, output and cache holds at most MAX_TENSOR_BYTES, and so does a cache padded to
      whole tiles of the resolution it is updated on (the runtime gathers such tiles);
    - every spatial input is ``[batch, C, H, W]`` with ``[H, W]`` the mask program's input size;
    - the mask program is well formed (each instruction's fields match its op, it reads only masks
      defined before it, a union's masks share one size, each resolution's mask has the
      resolution's size), and one run of it, tile indices included, allocates plus visits at most
      MAX_MASK_CELLS mask cells.

    Raises ManifestSchemaError naming the field at fault.
    """
    batch = manifest.get("batch", 1)
    _check_tensor_sizes(manifest)
    height, width = manifest["mask_program"]["input_size"]
    for position, spec in enumerate(manifest["inputs"]):
        shape = spec["shape"]
        if spec["spatial"] and (len(shape) != 4 or shape[0] != batch or shape[2:] != [height, width]):
            raise ManifestSchemaError(
                f"inputs[{position}].shape",
                f"is {shape}; a spatial input must be [batch {batch}, C, {height}, {width}] "
                f"(mask_program.input_size)",
            )
    mask_program_cells(manifest)


def _check_tensor_sizes(manifest: Mapping[str, Any]) -> None:
    for section in ("inputs", "outputs", "caches"):
        for position, spec in enumerate(manifest[section]):
            nbytes = math.prod(spec["shape"]) * TENSOR_DTYPES[spec["dtype"]]
            if nbytes > MAX_TENSOR_BYTES:
                raise ManifestSchemaError(
                    f"{section}[{position}].shape",
                    f"{spec['shape']} of {spec['dtype']} is {nbytes} bytes, more than {MAX_TENSOR_BYTES}",
                )
    caches = {spec["name"]: spec for spec in manifest["caches"]}
    tiles = {res["name"]: res["tile"] for res in manifest["resolutions"]}
    for position, update in enumerate(manifest["updates"]):
        cache, tile = caches.get(update["cache"]), tiles.get(update["resolution"])
        if cache is None or tile is None or len(cache["shape"]) != 4 or update.get("whole"):
            continue  # a dangling reference is the runtime's to report; it allocates nothing
        batch, channels, height, width = cache["shape"]
        padded = batch * channels * _round_up(height, tile) * _round_up(width, tile)
        nbytes = padded * TENSOR_DTYPES[cache["dtype"]]
        if nbytes > MAX_TENSOR_BYTES:
            raise ManifestSchemaError(
                f"updates[{position}]",
                f"cache {update['cache']!r} in whole tiles of {tile} is {nbytes} bytes, more than {MAX_TENSOR_BYTES}",
            )


def mask_program_cells(manifest: Mapping[str, Any]) -> int:
    """An upper bound of the mask cells one run of the mask program (tile indices included) allocates
    plus visits, found by following the mask sizes through it; ``manifest`` matches the schema.

    Raises ManifestSchemaError when the program is malformed or the count exceeds MAX_MASK_CELLS.
    """
    program = manifest["mask_program"]
    batch = manifest.get("batch", 1)
    sizes: dict[str, tuple[int, int]] = {INPUT_MASK: tuple(program["input_size"])}
    height, width = sizes[INPUT_MASK]
    cost = _MaskCost(batch)
    cost.add("mask_program.input_size", height * width)
    cost.add("mask_program.dilation", _dilate_cells(sizes[INPUT_MASK], program["dilation"]))
    for position, instruction in enumerate(program["instructions"]):
        field = f"mask_program.instructions[{position}]"
        validate(instruction, MASK_INSTRUCTIONS[instruction["op"]], field)
        names = instruction["srcs"] if instruction["op"] == "union" else [instruction.get("src")]
        sources = []
        for name in names:
            if name is not None and name not in sizes:
                raise ManifestSchemaError(field, f"reads mask {name!r}, which no earlier instruction defines")
            sources.append(sizes.get(name))
        size, cells = _instruction_cost(instruction, sources, field)
        cost.add(field, cells)
        sizes[instruction["out"]] = size
    for position, res in enumerate(manifest["resolutions"]):
        field = f"resolutions[{position}]"
        size = sizes.get(res["mask"])
        if size is None:
            raise ManifestSchemaError(f"{field}.mask", f"names mask {res['mask']!r}, which the mask program lacks")
        if list(size) != res["size"]:
            raise ManifestSchemaError(f"{field}.mask", f"names a {list(size)} mask for a {res['size']} resolution")
        cost.add(f"{field}.tile", _tile_index_cells(size, res["tile"]))
    return cost.total


class _MaskCost:
    """A running total of the mask cells one run allocates plus visits, for a batch of masks."""

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.total = 0

    def add(self, field: str, cells: int) -> None:
        self.total += self.batch * cells
        if self.total > MAX_MASK_CELLS:
            raise ManifestSchemaError(
                field,
                f"brings one run of the mask program to {self.total} mask cells allocated and visited "
                f"(batch {self.batch}), more than {MAX_MASK_CELLS}",
            )


# The cell counts below follow sigec.core.mask_program's numpy code for one batch item: every array
# it allocates and every pass over one, rounded up; they need only be upper bounds of the right size.


def _instruction_cost(instruction: Mapping[str, Any], sources: Sequence[tuple[int, int] | None],
                      field: str) -> tuple[tuple[int, int], int]:
    """The size of the mask an instruction makes and the cells it allocates plus visits."""
    op = instruction["op"]
    if op == "union":
        if len(set(sources)) != 1:
            raise ManifestSchemaError(f"{field}.srcs", f"unites masks of different sizes {[list(s) for s in sources]}")
        (height, width), = set(sources)
        return (height, width), (len(sources) + 1) * height * width
    if op == "empty":
        height, width = instruction["size"]
        return (height, width), height * width
    (height, width), = sources
    if op == "dilate":
        return (height, width), _dilate_cells((height, width), instruction["radius"])
    if op == "window":
        size = tuple(instruction["size"])
        cells = _window_cells((height, width), instruction["kernel"], instruction["stride"], instruction["pads"],
                              instruction.get("dilation", (1, 1)), size)
        return size, cells
    if op == "transpose_window":
        (kernel_h, kernel_w), (out_h, out_w) = instruction["kernel"], instruction["size"]
        # Worst case every pixel is active: a few index arrays of kernel_h * kernel_w taps per pixel.
        cells = out_h * out_w + height * width * (1 + 8 * kernel_h * kernel_w)
        return (out_h, out_w), cells
    if op == "upsample":
        (factor_h, factor_w), (out_h, out_w) = instruction["factor"], instruction["size"]
        # Repeated along both axes before the crop, which is a view of the repeated array.
        cells = height * factor_h * width * (1 + factor_w)
        return (min(height * factor_h, out_h), min(width * factor_w, out_w)), cells
    # resample: int32 prefix sums along each axis (4 bytes a cell, a few arrays).
    out_h, out_w = instruction["size"]
    return (out_h, out_w), 16 * (max(height, out_h) + 1) * (max(width, out_w) + 1)


def _window_cells(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], pads: Sequence[int],
                  dilation: Sequence[int], out: Sequence[int]) -> int:
    """Cells of a sliding-window "any": the padded input, then one pass per tap along rows and columns."""
    padded_h = max(size[0] + pads[0], (out[0] - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1)
    padded_w = max(size[1] + pads[1], (out[1] - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1)
    return padded_h * padded_w + out[0] * padded_w * (kernel[0] + 1) + out[0] * out[1] * (kernel[1] + 1)


def _dilate_cells(size: Sequence[int], radius: int) -> int:
    """Cells of a square dilation (a window of side 2 * radius + 1 with stride 1)."""
    if radius <= 0:
        return 0
    side = 2 * radius + 1
    return _window_cells(size, (side, side), (1, 1), (radius,) * 4, (1, 1), size)


def _tile_index_cells(size: Sequence[int], tile: int) -> int:
    """Cells of a tile index: the mask padded to whole tiles, plus int64 coordinates and grid per tile."""
    grid_h, grid_w = -(-size[0] // tile), -(-size[1] // tile)
    return 2 * grid_h * tile * grid_w * tile + 32 * grid_h * grid_w


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
