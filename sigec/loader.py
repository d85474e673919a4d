"""``sigec.load``: read an engine file and create its runtime."""

from __future__ import annotations

import os

import onnx

from sigec.core.engine_file import read_engine
from sigec.core.errors import BackendError, EngineFileError
from sigec.core.options import BACKENDS
from sigec.runtime.backends import make_runners
from sigec.runtime.engine import Engine


def load(path: str | os.PathLike, *, backend: str | None = None, threads: int | None = None, device: str = "cpu",
         dense_fallback_fraction: float | None = None, max_cache_bytes: int | None = None,
         precision: str | None = None) -> Engine:
    """Load an engine file; ``backend`` overrides the one it was compiled for ("ort", "torch" or "tensorrt").

    ``tensorrt`` runs the TensorRT plans stored in the file (``precision``: "fp32" or "fp16"; default
    fp32 when built) on a CUDA GPU.

    ``max_cache_bytes`` bounds the memory held by primed keys: the least recently used key is
    evicted when a new ``prime`` would exceed it (see ``sigec.runtime.engine``).
    """

    contents = read_engine(path)
    chosen = backend or contents.manifest.get("backend", "ort")
    if chosen not in BACKENDS:
        raise BackendError(f"engine '{path}' was compiled for backend {chosen!r}, which this runtime cannot run; "
                           f"pass backend='ort', 'torch' or 'tensorrt'")
    graphs = {}
    for name in ("full", "sparse", "dense"):
        try:
            graphs[name] = onnx.ModelProto.FromString(contents.graphs[name])
        except Exception as exc:
            raise EngineFileError(f"engine '{path}': graph '{name}' is not a valid ONNX model: {exc}") from exc
    runners = make_runners(chosen, graphs, contents.weights, threads=threads, device=device,
                           manifest=contents.manifest, blobs=contents.blobs, precision=precision)
    return Engine(contents.manifest, runners, path=os.fspath(path), dense_fallback_fraction=dense_fallback_fraction,
                  max_cache_bytes=max_cache_bytes)
