"""``sigec.load``: read an engine file and create its runtime."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import onnx
import onnx_ir as ir

from sigec.core.engine_file import read_engine
from sigec.core.errors import BackendError, EngineFileError, InputError
from sigec.core.options import BACKENDS, CACHE_DTYPES
from sigec.passes.half_caches import recast_caches
from sigec.runtime.backends import make_runners
from sigec.runtime.engine import Engine


def load(path: str | os.PathLike, *, backend: str | None = None, threads: int | None = None, device: str = "cpu",
         dense_fallback_fraction: float | None = None, max_cache_bytes: int | None = None,
         precision: str | None = None, cache_dtype: str | None = None) -> Engine:
    """Load an engine file; ``backend`` overrides the one it was compiled for ("ort", "torch" or "tensorrt").

    ``tensorrt`` runs the TensorRT plans stored in the file (``precision``: "fp32" or "fp16"; default
    fp32 when built) on a CUDA GPU.

    ``max_cache_bytes`` bounds the memory held by primed keys: the least recently used key is
    evicted when a new ``prime`` would exceed it (see ``sigec.runtime.engine``).

    ``cache_dtype`` ("float32", "float16" or "bfloat16"; None: the engine's, ``options.cache_dtype`` of
    its manifest) stores the caches as compiling with it would (passes/half_caches.py,
    ``recast_caches``; the file is unchanged): "float32" keeps an approx engine's caches unrounded at
    twice the memory, "float16" halves an exact engine's caches but makes its runs approximate (each
    cached value rounded to 11 significant bits). The TensorRT backend takes float32 caches only.
    """
    if cache_dtype is not None and cache_dtype not in CACHE_DTYPES:
        raise InputError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)} (or None: as compiled), "
                         f"not {cache_dtype!r}")
    contents = read_engine(path)
    chosen = backend or contents.manifest.get("backend", "ort")
    if chosen not in BACKENDS:
        raise BackendError(f"engine '{path}' was compiled for backend {chosen!r}, which this runtime cannot run; "
                           f"pass backend='ort', 'torch' or 'tensorrt'")
    if chosen == "tensorrt" and cache_dtype not in (None, "float32"):
        raise BackendError(f"cache_dtype={cache_dtype!r}: the TensorRT backend reads float32 caches only; "
                           f"pass cache_dtype='float32' (or None) with backend='tensorrt'")
    graphs = {}
    for name in ("full", "sparse", "dense"):
        try:
            graphs[name] = onnx.ModelProto.FromString(contents.graphs[name])
        except Exception as exc:
            raise EngineFileError(f"engine '{path}': graph '{name}' is not a valid ONNX model: {exc}") from exc
    manifest = contents.manifest
    compiled = manifest.get("options", {}).get("cache_dtype", "float32")
    if cache_dtype is not None and cache_dtype != compiled and chosen != "tensorrt":  # TensorRT runs its plans
        manifest = _recast(graphs, manifest, cache_dtype)
    runners = make_runners(chosen, graphs, contents.weights, threads=threads, device=device,
                           manifest=contents.manifest, blobs=contents.blobs, precision=precision)
    return Engine(manifest, runners, path=os.fspath(path), dense_fallback_fraction=dense_fallback_fraction,
                  max_cache_bytes=max_cache_bytes)


def _recast(graphs: dict[str, onnx.ModelProto], manifest: Mapping[str, Any], cache_dtype: str) -> dict[str, Any]:
    """Replace the FULL and SPARSE graphs by their versions with ``cache_dtype`` caches; return the manifest."""
    logger = logging.getLogger("onnx_ir.serde")  # warns about every weight: the graphs hold none (engine_file.py)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        full, sparse = (ir.serde.deserialize_model(graphs[name]) for name in ("full", "sparse"))
    finally:
        logger.setLevel(level)
    manifest = recast_caches(full, sparse, manifest, cache_dtype)
    graphs["full"], graphs["sparse"] = ir.serde.serialize_model(full), ir.serde.serialize_model(sparse)
    return manifest
