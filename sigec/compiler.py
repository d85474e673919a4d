"""``sigec.compile``: frontend -> canonical ONNX -> sparse rewrite -> engine file."""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from sigec import autotune as tuner
from sigec.core import VERSION
from sigec.core.engine_file import EngineContents, write_engine
from sigec.core.errors import CompileError
from sigec.core.options import (BACKENDS, CACHE_DTYPES, DEFAULT_APPROX_DILATION, DEFAULT_BACKEND, DEFAULT_DILATION,
                                DEFAULT_MODE, DEFAULT_NORM_STATS, DEFAULT_OPSET, DEFAULT_THRESHOLD, DEFAULT_TILE_SIZE,
                                DENSE_FALLBACK_FRACTION, MODES, NORM_STATS)
from sigec.frontends.onnx_frontend import load_onnx
from sigec.passes.sparse_rewrite import RewriteResult, rewrite
from sigec.passes.tensorrt_build import build_plans, missing_requirements, unavailable_message, with_plans
from sigec.progress import Steps


def _load_source(source: Any, inputs: Any, opset: int) -> onnx.ModelProto | ir.Model | str:
    """An ONNX path or proto as is; an nn.Module (or factory spec) exported with torch.onnx to an
    in-memory model (its weights are the module's tensors: any size compiles)."""
    if isinstance(source, (str, os.PathLike)) and (str(source).endswith(".onnx") or os.path.exists(source)):
        return os.fspath(source)
    if isinstance(source, (onnx.ModelProto, ir.Model)):
        return source
    from sigec.frontends.torch_frontend import export_module_ir, load_factory  # imports torch: only when needed

    if isinstance(source, str):
        module, example = load_factory(source)
        inputs = inputs if inputs is not None else example
    else:
        module = source
    if inputs is None:
        raise CompileError("compiling a PyTorch module needs example inputs (inputs=tensor, tuple or dict)")
    return export_module_ir(module, inputs, opset=opset)


def engine_graphs(result: RewriteResult) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The rewrite's graphs serialised for the engine file (they hold no initializers), and its weights."""
    for role, proto in result.graphs.items():
        if len(proto.graph.initializer):
            raise CompileError(f"internal: the {role.upper()} graph still holds initializers")
    return {role: proto.SerializeToString() for role, proto in result.graphs.items()}, result.weights


def compile(source: Any, output_path: str | os.PathLike, *, inputs: Any = None, mode: str = DEFAULT_MODE,
            backend: str = DEFAULT_BACKEND, tile_size: int | Mapping[str, int] | None = None,
            input_shapes: Mapping[str, Sequence[int]] | None = None, fallback: str = "error",
            threshold: float | None = None, dilation: int | None = None,
            approx_dilation: int = DEFAULT_APPROX_DILATION,
            dense_fallback_fraction: float = DENSE_FALLBACK_FRACTION, opset: int = DEFAULT_OPSET, dense_resolutions: Sequence[str] = (),
            autotune: bool = False, autotune_edits: Sequence[float] | None = None,
            autotune_threads: int | None = None, progress: bool = False,
            cache_dtype: str | None = None,
            norm_stats: str | None = None) -> pathlib.Path:
    """Compile a model (an .onnx path, an ``onnx.ModelProto``, an ``onnx_ir.Model`` (transformed in place),
    an ``nn.Module`` or a ``pkg.module:factory`` spec) into an engine file at ``output_path`` and return
    its path. No size limit: weights are never serialised into a protobuf (passes/weightless.py).

    ``mode`` is ``"exact"`` (sparse output equals dense for local models) or ``"approx"``
    (SIGE-compatible masks and frozen normalisation statistics). ``tile_size`` is one int for every
    resolution or a mapping ``{"r64x64": 8, "default": 8}``. ``fallback="dense"`` keeps unsupported
    nodes dense instead of failing. ``threshold`` and ``dilation`` set the default change-detection
    for ``Engine.run(mask=None)``. ``approx_dilation`` (approx mode) is how many cells each resolution's
    tile mask grows around the resampled edit. ``dense_resolutions`` (approx mode) lists resolutions such as
    ``"r8x8"`` that run dense: small maps that most edits activate entirely run faster dense.
    ``cache_dtype`` ("float32", "float16" or "bfloat16"; default by mode: ``DEFAULT_CACHE_DTYPE``) is
    the precision the caches only TileGather/TileScatter read are stored in (the others stay float32;
    passes/half_caches.py). ``autotune=True`` chooses the tile size or dense execution of every resolution by measuring
    candidates on this machine (``sigec.autotune``; edits ``autotune_edits``, ONNX Runtime with
    ``autotune_threads`` threads) and records the measurements in the manifest.
    ``norm_stats`` (approx mode; default ``DEFAULT_NORM_STATS``): GroupNorm / InstanceNorm of edited maps
    with statistics ``"frozen"`` from the original or ``"updated"`` from the active tiles
    (passes/norm_stats.py).
    """
    if mode not in MODES:
        raise CompileError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    norm_stats = DEFAULT_NORM_STATS if norm_stats is None else norm_stats
    if norm_stats not in NORM_STATS:
        raise CompileError(f"norm_stats must be one of {', '.join(NORM_STATS)}, not {norm_stats!r}")
    if cache_dtype is not None and cache_dtype not in CACHE_DTYPES:
        raise CompileError(f"cache_dtype must be one of {', '.join(CACHE_DTYPES)}, not {cache_dtype!r}")
    if backend == "tensorrt":
        if cache_dtype not in (None, "float32"):
            raise CompileError(f"cache_dtype={cache_dtype!r}: the TensorRT plugins read float32 caches only; "
                               f"use cache_dtype='float32' with backend='tensorrt'")
        cache_dtype = "float32"
    if backend not in BACKENDS:
        raise CompileError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "tensorrt":
        problems = missing_requirements()
        if problems:
            raise CompileError(unavailable_message(problems))
    tiles: int | dict[str, int] = DEFAULT_TILE_SIZE if tile_size is None else (
        dict(tile_size) if isinstance(tile_size, Mapping) else int(tile_size))
    for t in (tiles.values() if isinstance(tiles, dict) else [tiles]):
        if int(t) < 1:
            raise CompileError(f"tile size must be a positive integer, got {t}")
    steps = Steps(enabled=progress)
    with steps.step("frontend"):
        model = load_onnx(_load_source(source, inputs, opset), input_shapes)

    def build(tiles: int | dict[str, int], dense_res: Sequence[str], record: dict | None,
              shown: Steps = steps) -> EngineContents:
        """Rewrite the canonical model (not modified, so autotuning reuses it) and pack an engine."""
        with shown.step("sparse rewrite"):
            result = rewrite(model, mode=mode, tile_size=tiles, fallback=fallback,
                             threshold=DEFAULT_THRESHOLD[mode] if threshold is None else float(threshold),
                             dilation=DEFAULT_DILATION[mode] if dilation is None else int(dilation),
                             approx_dilation=approx_dilation, dense_resolutions=tuple(dense_res),
                             norm_stats=norm_stats,
                             cache_dtype=cache_dtype)
        with shown.step("pack graphs"):
            graphs, weights = engine_graphs(result)
            manifest = {**result.manifest, "sigec_version": VERSION, "backend": backend,
                        "options": {**result.manifest.get("options", {}),
                                    "tile_size": tiles, "fallback": fallback, "approx_dilation": approx_dilation,
                                    "dense_fallback_fraction": float(dense_fallback_fraction), "opset": opset,
                                    "dense_resolutions": list(dense_res), "norm_stats": norm_stats,
                                    **({"autotune": record} if record else {})}}
            return EngineContents(manifest=manifest, graphs=graphs, weights=weights)

    autotune_record = None
    if autotune:
        if tile_size is not None or dense_resolutions:
            raise CompileError("autotune chooses the tile sizes and dense resolutions itself: "
                               "do not pass tile_size or dense_resolutions with it")
        def compile_candidate(path: pathlib.Path, plan: tuner.Plan) -> pathlib.Path:
            steps.log(f"autotune: compiling tile sizes {plan.tile_size}, dense {plan.dense_resolutions or 'none'}")
            quiet = Steps(enabled=False)  # inside the "autotune" step's display
            return pathlib.Path(write_engine(path, build(plan.tile_size, plan.dense_resolutions, None, quiet)))

        with steps.step("autotune"):
            tuned = tuner.tune(compile_candidate, mode=mode, edits=autotune_edits or tuner.DEFAULT_EDITS,
                               threads=autotune_threads, log=steps.log)
        tiles, dense_resolutions, autotune_record = tuned.plan.tile_size, tuned.plan.dense_resolutions, tuned.record
    contents = build(tiles, dense_resolutions, autotune_record)
    if backend == "tensorrt":
        with steps.step("TensorRT plans"):
            contents = with_plans(contents, *build_plans(contents))
    with steps.step("write engine"):
        path = write_engine(output_path, contents)
    return pathlib.Path(path)
