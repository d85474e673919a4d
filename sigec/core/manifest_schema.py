"""The engine manifest's schema, as plain data, and a small validator for it.

The schema language is a tiny subset of JSON Schema, so the same data could be fed to ``jsonschema``:
``type`` (string, integer, number, boolean, array, object), ``enum``, ``minimum``, ``pattern``,
``items``, ``minItems``, ``maxItems``, ``properties``, ``required`` and ``additionalProperties``
(a schema for the values of unlisted keys; unlisted keys are allowed by default).

To add a manifest field, add one entry to ``MANIFEST_FIELDS`` (required) or ``OPTIONAL_FIELDS``
(validated when present); the storage fields that ``sigec.core.engine_file`` writes itself live in
``STORAGE_FIELDS``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from sigec.core.errors import EngineFileError
from sigec.core.options import BACKENDS, MODES

Schema = Mapping[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NON_NEGATIVE_INTEGER: Schema = {"type": "integer", "minimum": 0}
POSITIVE_INTEGER: Schema = {"type": "integer", "minimum": 1}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}
ANY_OBJECT: Schema = {"type": "object"}
SHA256_HEX: Schema = {"type": "string", "pattern": "[0-9a-f]{64}"}


def one_of(*choices: str) -> Schema:
    """A string that must be one of ``choices``."""
    return {"type": "string", "enum": list(choices)}


def array_of(items: Schema, *, length: int | None = None) -> Schema:
    """A list whose elements all match ``items`` (of exactly ``length`` elements when given)."""
    schema: dict[str, Any] = {"type": "array", "items": items}
    if length is not None:
        schema["minItems"] = schema["maxItems"] = length
    return schema


def record(**fields: Schema) -> Schema:
    """An object that must hold every one of ``fields``; other keys are allowed and not checked."""
    return {"type": "object", "properties": dict(fields), "required": list(fields)}


SHAPE = array_of(INTEGER)
SIZE_2D = array_of(POSITIVE_INTEGER, length=2)

# The compiler's manifest: one entry per top-level field.
MANIFEST_FIELDS: dict[str, Schema] = {
    "format": STRING,
    "format_version": INTEGER,
    "sigec_version": STRING,
    "backend": one_of(*BACKENDS),
    "mode": one_of(*MODES),
    "inputs": array_of(record(name=STRING, shape=SHAPE, dtype=STRING, spatial=BOOLEAN)),
    "outputs": array_of(record(name=STRING, shape=SHAPE, dtype=STRING)),
    "caches": array_of(record(name=STRING, source=STRING, shape=SHAPE, dtype=STRING, kind=STRING)),
    "resolutions": array_of(record(name=STRING, size=SIZE_2D, tile=POSITIVE_INTEGER)),
    "mask_program": record(
        input_size=SIZE_2D,
        threshold=NUMBER,
        dilation=NON_NEGATIVE_INTEGER,
        instructions=array_of(record(op=STRING)),
    ),
    "updates": array_of(record(output=STRING, cache=STRING, resolution=STRING)),
    "approximations": array_of(ANY_OBJECT),
    "nodes": array_of(ANY_OBJECT),
    "options": ANY_OBJECT,
}

# What the engine file adds when it stores the manifest (see sigec.core.engine_file).
STORAGE_FIELDS: dict[str, Schema] = {
    "members": {"type": "object", "additionalProperties": record(size=NON_NEGATIVE_INTEGER, sha256=SHA256_HEX)},
    "weights": array_of(
        record(
            name=STRING,
            dtype=STRING,
            shape=array_of(NON_NEGATIVE_INTEGER),
            offset=NON_NEGATIVE_INTEGER,
            nbytes=NON_NEGATIVE_INTEGER,
        )
    ),
}

PROFILE = record(input=STRING, min=SHAPE, opt=SHAPE, max=SHAPE)

# Optional sections: validated when present.
OPTIONAL_FIELDS: dict[str, Schema] = {
    # TensorRT plans stored as blobs (sigec.passes.tensorrt_build).
    "tensorrt": record(
        tensorrt_version=STRING,
        device=record(name=STRING, compute_capability=array_of(NON_NEGATIVE_INTEGER, length=2)),
        precisions={**array_of(one_of("fp32", "fp16")), "minItems": 1},
        plugin_namespace=STRING,
        plans={**array_of(record(graph=one_of("full", "sparse", "dense"), precision=one_of("fp32", "fp16"),
                                 blob={"type": "string", "pattern": "tensorrt/[a-z]+_fp(32|16)\\.plan"},
                                 bytes=POSITIVE_INTEGER, sha256=SHA256_HEX, profiles=array_of(PROFILE))),
               "minItems": 1},
    ),
}


def _with_optional(schema: Schema) -> Schema:
    return {**schema, "properties": {**schema["properties"], **OPTIONAL_FIELDS}}


MANIFEST_SCHEMA: Schema = _with_optional(record(**MANIFEST_FIELDS))
STORED_MANIFEST_SCHEMA: Schema = _with_optional(record(**MANIFEST_FIELDS, **STORAGE_FIELDS))


class ManifestSchemaError(EngineFileError):
    """A manifest value does not match the schema; ``field`` is its path, e.g. ``inputs[0].shape``."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"manifest field {field!r} {problem}" if field else f"manifest {problem}")


def validate_manifest(manifest: Any, *, stored: bool = False) -> None:
    """Check ``manifest`` against the compiler's schema (plus the storage fields when ``stored``).

    Raises ManifestSchemaError naming the first field at fault.
    """
    validate(manifest, STORED_MANIFEST_SCHEMA if stored else MANIFEST_SCHEMA)


def validate(value: Any, schema: Schema, field: str = "") -> None:
    """Check ``value`` against ``schema`` (the subset described in the module docstring)."""
    kind = schema.get("type")
    if kind is not None and not _TYPE_CHECKS[kind](value):
        raise ManifestSchemaError(field, f"must be {_TYPE_NAMES[kind]}, got {_describe(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ManifestSchemaError(field, f"must be one of {schema['enum']}, got {value!r}")
    if "minimum" in schema and value < schema["minimum"]:
        raise ManifestSchemaError(field, f"must be at least {schema['minimum']}, got {value!r}")
    if "pattern" in schema and not re.fullmatch(schema["pattern"], value):
        raise ManifestSchemaError(field, f"must match {schema['pattern']!r}, got {value!r}")
    if isinstance(value, list):
        _validate_array(value, schema, field)
    elif isinstance(value, dict):
        _validate_object(value, schema, field)


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
