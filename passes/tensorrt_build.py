"""Build TensorRT plans for an engine file's graphs (the ``tensorrt`` backend).

``build_plans`` attaches the weights to the FULL, SPARSE and DENSE graphs, annotates the SPARSE
graph's ``ai.sigec`` nodes for the sigec plugins (:mod:`sigec.passes.annotate_tensorrt`), gives
every tile-count input an optimization profile, and asks a :class:`PlanBuilder` for one plan per
graph and precision. The plans go into the engine file as blobs ``tensorrt/<graph>_<precision>.plan``
with a manifest section ``tensorrt`` (TensorRT version, GPU, precisions, plans, profile ranges).

The real builder (:class:`TensorRTBuilder`) needs ``tensorrt >= 10.9`` and a CUDA GPU; the
orchestration is independent of it and is tested with a fake builder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
import tempfile
from typing import Any, Mapping, Protocol, Sequence

import numpy as np
import onnx

from sigec.core.engine_file import read_engine, write_engine
from sigec.core.errors import CompileError
from sigec.core.names import COORDS_PREFIX, tile_input_resolution
from sigec.core.ops import DOMAIN
from sigec.core.tensorrt_abi import (BLOB_DIR, GRAPHS, MIN_TENSORRT, PRECISIONS, blob_name,  # noqa: F401
                                     missing_requirements, unavailable_message)
from sigec.passes.annotate_tensorrt import annotate

DEFAULT_OPT_FRACTION = 0.1  # the profile's "typical" tile count: 10 % of the tiles (edits are small)


@dataclasses.dataclass(frozen=True)
class Profile:
    """The shape range of one dynamic input (TensorRT optimization profile)."""

    input: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def as_json(self) -> dict[str, Any]:
        return {"input": self.input, "min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


class PlanBuilder(Protocol):
    """Builds one serialized plan from an ONNX model with weights attached."""

    def environment(self) -> dict[str, Any]:
        """``{"tensorrt_version": str, "device": {"name": str, "compute_capability": [major, minor]}}``."""

    def build(self, model: onnx.ModelProto, *, graph: str, precision: str, profiles: Sequence[Profile]) -> bytes:
        """The serialized plan."""


# ---------------------------------------------------------------------------------------------- graphs and profiles


def attach_weights(graph: bytes | onnx.ModelProto, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of an engine graph with the weights it reads embedded as initializers."""
    model = onnx.ModelProto.FromString(graph if isinstance(graph, bytes) else graph.SerializeToString())
    used = {name for node in model.graph.node for name in node.input}
    present = {t.name for t in model.graph.initializer}
    for name in sorted(used & set(weights) - present):
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(weights[name]), name))
    return model


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param if d.dim_param or not d.HasField("dim_value") else d.dim_value
            for d in value.type.tensor_type.shape.dim]


def tile_profiles(model: onnx.ModelProto, manifest: Mapping[str, Any], *, opt_fraction: float = DEFAULT_OPT_FRACTION,
                  min_tiles: int = 0) -> list[Profile]:
    """One profile per dynamic input: the tile coordinates ``tiles::coords::<res>`` [N, 3] with
    N in ``[min_tiles, all tiles of <res>]``, opt = ``opt_fraction`` of them (at least 1)."""
    resolutions = {r["name"]: r for r in manifest["resolutions"]}
    batch = int(manifest.get("batch", 1))
    initializers = {t.name for t in model.graph.initializer}
    profiles = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = _dims(value)
        if all(isinstance(d, int) for d in dims):
            continue
        res = tile_input_resolution(value.name) if value.name.startswith(COORDS_PREFIX) else None
        if res not in resolutions or len(dims) != 2 or dims[1] != 3:
            raise CompileError(f"graph '{model.graph.name}': input '{value.name}' has dynamic shape {dims}; only "
                               f"the tile coordinates ({COORDS_PREFIX}<resolution>, [N, 3]) may be dynamic")
        r = resolutions[res]
        tile = int(r["tile"])
        total = batch * math.ceil(r["size"][0] / tile) * math.ceil(r["size"][1] / tile)
        opt = min(total, max(1, math.ceil(total * opt_fraction)))
        low = min(int(min_tiles), opt)
        profiles.append(Profile(value.name, (low, 3), (opt, 3), (total, 3)))
    return profiles


def prepare_graph(name: str, graph: bytes, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The ONNX model TensorRT parses for engine graph ``name`` (weights attached; SPARSE annotated)."""
    model = attach_weights(graph, weights)
    return annotate(model) if any(n.domain == DOMAIN for n in model.graph.node) else model


# ---------------------------------------------------------------------------------------------- orchestration


def build_plans(contents: Any, *, precisions: Sequence[str] = PRECISIONS, builder: PlanBuilder | None = None,
                graphs: Sequence[str] = GRAPHS, opt_fraction: float = DEFAULT_OPT_FRACTION,
                min_tiles: int = 0) -> tuple[dict[str, bytes], dict[str, Any]]:
    """Plans for ``contents`` (an ``EngineContents``): ``(blobs, manifest section)``.

    Raises CompileError when a precision or graph is unknown, or a build fails.
    """
    precisions = list(dict.fromkeys(precisions))
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or not precisions:
        raise CompileError(f"TensorRT precisions must be some of {list(PRECISIONS)}, got {list(precisions)}")
    unknown = [g for g in graphs if g not in contents.graphs]
    if unknown:
        raise CompileError(f"the engine has no graphs {unknown}")
    half = sorted({c["dtype"] for c in contents.manifest.get("caches", []) if c.get("dtype") in ("float16", "bfloat16")})
    if half:  # one float type per plugin kernel (plugins/gpu/tensorrt_kernels.py): a half base would be misread
        raise CompileError(f"the engine stores caches in {' and '.join(half)} (cache_dtype); the TensorRT plugins "
                           f"read float32 caches only: compile it with cache_dtype='float32' (sigec compile "
                           f"--cache-dtype float32) to build TensorRT plans")
    if builder is None:
        problems = missing_requirements()
        if problems:
            raise CompileError(unavailable_message(problems))
        builder = TensorRTBuilder()
    env = builder.environment()
    blobs: dict[str, bytes] = {}
    plans = []
    for graph in graphs:
        model = prepare_graph(graph, contents.graphs[graph], contents.weights)
        profiles = tile_profiles(model, contents.manifest, opt_fraction=opt_fraction, min_tiles=min_tiles)
        for precision in precisions:
            data = bytes(builder.build(model, graph=graph, precision=precision, profiles=profiles))
            if not data:
                raise CompileError(f"TensorRT returned an empty plan for the {graph.upper()} graph ({precision})")
            name = blob_name(graph, precision)
            blobs[name] = data
            plans.append({"graph": graph, "precision": precision, "blob": name, "bytes": len(data),
                          "sha256": hashlib.sha256(data).hexdigest(),
                          "profiles": [p.as_json() for p in profiles]})
    section = {"tensorrt_version": str(env["tensorrt_version"]),
               "device": {"name": str(env["device"]["name"]),
                          "compute_capability": [int(v) for v in env["device"]["compute_capability"]]},
               "precisions": precisions, "plugin_namespace": "sigec", "plans": plans}
    return blobs, section


def with_plans(contents: Any, blobs: Mapping[str, bytes], section: Mapping[str, Any]) -> Any:
    """A copy of ``contents`` holding ``blobs`` (replacing earlier TensorRT plans) and the manifest section."""
    kept = {k: v for k, v in contents.blobs.items() if not k.startswith(BLOB_DIR + "/")}
    return dataclasses.replace(contents, manifest={**contents.manifest, "tensorrt": dict(section)},
                               blobs={**kept, **blobs})


def build_engine_file(path: str | os.PathLike, output: str | os.PathLike | None = None, *,
                      precisions: Sequence[str] = PRECISIONS, builder: PlanBuilder | None = None,
                      **options: Any) -> pathlib.Path:
    """Add TensorRT plans to the engine file ``path``, written to ``output`` (default: ``path``).

    The file is written atomically: on any failure the original is untouched.
    """
    contents = read_engine(path)
    blobs, section = build_plans(contents, precisions=precisions, builder=builder, **options)
    return write_engine(output if output is not None else path, with_plans(contents, blobs, section))


# ---------------------------------------------------------------------------------------------- TensorRT


class TensorRTBuilder:
    """Builds plans with TensorRT's ONNX parser and the sigec plugins (needs tensorrt >= 10.9 and a GPU)."""

    def __init__(self, *, workspace_bytes: int | None = None, verbose: bool = False) -> None:
        import tensorrt as trt

        from sigec.gpu import tensorrt_plugins  # noqa: F401 - registers the plugins before parsing

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        self.workspace_bytes = workspace_bytes

    def environment(self) -> dict[str, Any]:
        import torch

        return {"tensorrt_version": self.trt.__version__,
                "device": {"name": torch.cuda.get_device_name(),
                           "compute_capability": list(torch.cuda.get_device_capability())}}

    def build(self, model: onnx.ModelProto, *, graph: str, precision: str, profiles: Sequence[Profile]) -> bytes:
        trt = self.trt
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        with tempfile.TemporaryDirectory(prefix="sigec-trt-") as folder:
            path = os.path.join(folder, f"{graph}.onnx")
            onnx.save_model(model, path, save_as_external_data=True, location="weights.bin")
            if not parser.parse_from_file(path):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise CompileError(f"TensorRT could not parse the {graph.upper()} graph: {errors}")
        config = builder.create_builder_config()
        if self.workspace_bytes:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_bytes))
        if precision == "fp16":
            if not hasattr(trt.BuilderFlag, "FP16"):
                raise CompileError(f"TensorRT {trt.__version__} has no FP16 builder flag (weakly typed fp16)")
            config.set_flag(trt.BuilderFlag.FP16)
        if profiles:
            profile = builder.create_optimization_profile()
            for p in profiles:
                profile.set_shape(p.input, p.min, p.opt, p.max)
            config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise CompileError(f"TensorRT could not build the {graph.upper()} graph ({precision}); "
                               "rerun with verbose=True for TensorRT's log")
        return bytes(plan)
