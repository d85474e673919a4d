"""How sigec's operators and plans appear to TensorRT: the contract between the annotation pass
(:mod:`sigec.passes.annotate_tensorrt`), the plugins (:mod:`sigec.gpu.tensorrt_plugins`), the plan
builder (:mod:`sigec.passes.tensorrt_build`) and the runner (:mod:`sigec.runtime.tensorrt_runner`).

A ``TileGather`` with optional input groups ``vals`` (vals and grid), ``scale``, ``shift`` becomes
the plugin ``TileGather[_vals][_scale][_shift]`` in namespace :data:`PLUGIN_NAMESPACE`; its
attributes are encoded as ``geometry`` ints[9] and ``params`` floats[2] (see
:func:`decode_gather_attrs`). Plans are stored in the engine file as :func:`blob_name` blobs.
"""

from __future__ import annotations

from typing import Any, Sequence

from sigec.core.ops import ACTIVATIONS, PAD_MODES

TRT_DOMAIN = "ai.sigec.tensorrt"
"""Domain of annotated nodes (the parser looks plugins up by op_type; a custom domain keeps
``onnx.checker`` from looking for these ops in the standard operator set)."""
PLUGIN_NAMESPACE = "sigec"
GATHER_ATTRS = ("window", "step", "offset", "upsample", "pad_mode", "activation", "alpha", "beta")
GATHER_DEFAULTS: dict[str, Any] = {"offset": [0, 0], "upsample": 1, "pad_mode": "zeros", "activation": "none",
                                   "alpha": 0.0, "beta": 0.0}
OPTIONAL_GROUPS = ("vals", "scale", "shift")
INT32 = (-(2**31), 2**31 - 1)
MIN_TENSORRT = (10, 9)
PRECISIONS = ("fp32", "fp16")
GRAPHS = ("full", "sparse", "dense")
BLOB_DIR = "tensorrt"


def gather_plugin_name(present: Sequence[str]) -> str:
    """The plugin of a TileGather whose optional input groups ``present`` (vals, scale, shift) are given."""
    unknown = set(present) - set(OPTIONAL_GROUPS)
    if unknown:
        raise ValueError(f"unknown TileGather input groups {sorted(unknown)}")
    return "TileGather" + "".join(f"_{g}" for g in OPTIONAL_GROUPS if g in present)


def gather_plugin_groups(name: str) -> tuple[str, ...]:
    """Inverse of :func:`gather_plugin_name`."""
    if not name.startswith("TileGather"):
        raise ValueError(f"{name!r} is not a TileGather plugin")
    groups = tuple(g for g in name[len("TileGather"):].split("_") if g)
    if name != gather_plugin_name(groups):
        raise ValueError(f"{name!r} is not a TileGather plugin name")
    return groups


ALL_GATHER_PLUGINS = tuple(gather_plugin_name([g for i, g in enumerate(OPTIONAL_GROUPS) if mask >> i & 1])
                           for mask in range(2 ** len(OPTIONAL_GROUPS)))


def decode_gather_attrs(geometry: Sequence[Any], params: Sequence[Any], where: str = "TileGather") -> dict[str, Any]:
    """The TileGather attributes (docs/ops.md names) encoded in ``geometry`` and ``params``."""
    g = [int(v) for v in geometry]
    p = [float(v) for v in params]
    if len(g) != 9 or len(p) != 2:
        raise ValueError(f"{where}: geometry must have 9 values and params 2, got {g} and {p}")
    if not (0 <= g[7] < len(PAD_MODES) and 0 <= g[8] < len(ACTIVATIONS)):
        raise ValueError(f"{where}: pad_mode/activation codes {g[7]}, {g[8]} out of range")
    return {"window": g[0:2], "step": g[2:4], "offset": g[4:6], "upsample": g[6], "pad_mode": PAD_MODES[g[7]],
            "activation": ACTIVATIONS[g[8]], "alpha": p[0], "beta": p[1]}


def blob_name(graph: str, precision: str) -> str:
    """The engine-file blob holding the plan of ``graph`` in ``precision``."""
    return f"{BLOB_DIR}/{graph}_{precision}.plan"


def missing_requirements() -> list[str]:
    """What this machine lacks to build or run TensorRT plans (empty when nothing is missing)."""
    problems = []
    try:
        import tensorrt as trt

        version = tuple(int(p) for p in trt.__version__.split(".")[:2])
        if version < MIN_TENSORRT:
            problems.append(f"TensorRT {trt.__version__} is too old (sigec's plugins need >= "
                            f"{'.'.join(map(str, MIN_TENSORRT))})")
    except ImportError:
        problems.append("the Python package `tensorrt` (>= 10.9) is not installed")
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    except ImportError:
        problems.append("PyTorch is not installed")
    return problems


def unavailable_message(problems: Sequence[str]) -> str:
    """The error text for a TensorRT build that cannot run here."""
    return ("the TensorRT backend builds its plans on the GPU they will run on, and here "
            + "; ".join(problems) + ". Compile with --backend ort on this machine, then on a machine with "
            "TensorRT >= 10.9 and the GPU run `sigec build-trt ENGINE` (see README: TensorRT)")
