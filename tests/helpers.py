"""Shared test helpers: compile a proto in memory into an Engine without touching disk; run a script
with Triton's real compiler."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx

from sigec.compiler import _split_weights
from sigec.frontends.onnx_frontend import load_onnx
from sigec.passes.sparse_rewrite import rewrite
from sigec.runtime.backends import make_runners
from sigec.runtime.engine import Engine


def engine_from_proto(proto: onnx.ModelProto, *, mode: str = "exact", tile_size: int = 8, backend: str = "torch",
                      **rewrite_options) -> Engine:
    """Canonicalise, rewrite and load a model into an Engine (the engine-file step is skipped)."""
    result = rewrite(load_onnx(proto), mode=mode, tile_size=tile_size, **rewrite_options)
    graphs, weights = _split_weights({"full": result.full, "sparse": result.sparse, "dense": result.dense})
    runners = make_runners(backend, {k: onnx.ModelProto.FromString(v) for k, v in graphs.items()}, weights)
    return Engine(result.manifest, runners)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max absolute difference relative to the max magnitude of the reference."""
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def run_without_interpreter(script: str, timeout: int) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh process with Triton's real compiler (no TRITON_INTERPRET): compiling
    kernels ahead of time for a GPU does not need one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
