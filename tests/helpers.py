"""Shared test helpers.

- Engines: compile a proto in memory into an Engine without touching disk; force the sparse path.
- Oracles: the original model (the ONNX proto as given, or the PyTorch module) run by ONNX Runtime
  or PyTorch, and ``compare_with_oracle``, which measures an engine's prime / run / run_dense
  outputs against it together with the error of not recomputing at all.
- Error measures: ``rel_err`` (max-abs, relative), ``rel_l2`` (whole output or inside a region).
- Sparse op inputs for the kernel tests (ONNX Runtime, Triton, reference): ``sparse_input``,
  ``coords_of``, ``conv_attrs``, ``check_gather``.
- Hypothesis example counts that follow the loaded profile (tests/conftest.py).
- Tools and subprocesses: ``load_tool``, ``run_without_interpreter``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from hypothesis import settings

from sigec.compiler import engine_graphs
from sigec.core import reference_ops
from sigec.frontends.onnx_frontend import load_onnx
from sigec.passes.sparse_rewrite import rewrite
from sigec.runtime.backends import make_runners
from sigec.runtime.engine import Engine

ROOT = Path(__file__).resolve().parents[1]

EXACT_TOLERANCE = 1e-5
"""Exact mode: max |engine - oracle| / max |oracle| allowed for every output (float32 reordering)."""

ALWAYS_SPARSE = float("inf")
"""A ``dense_fallback_fraction`` that keeps every non-empty run on the sparse path."""

Inputs = Mapping[str, np.ndarray]
Oracle = Callable[[Inputs], list[np.ndarray]]


# ---------------------------------------------------------------------------------------------- engines


def engine_from_proto(proto: onnx.ModelProto, *, mode: str = "exact", tile_size: int = 8, backend: str = "torch",
                      **rewrite_options: Any) -> Engine:
    """Canonicalise, rewrite and load a model into an Engine (the engine-file step is skipped)."""
    result = rewrite(load_onnx(proto), mode=mode, tile_size=tile_size, **rewrite_options)
    graphs, weights = engine_graphs(result)
    runners = make_runners(backend, {k: onnx.ModelProto.FromString(v) for k, v in graphs.items()}, weights)
    return Engine(result.manifest, runners)


def always_sparse(engine: Engine) -> Engine:
    """``engine`` with the dense fallback switched off (every non-empty run takes the sparse path)."""
    engine.dense_fallback_fraction = ALWAYS_SPARSE
    return engine


# ---------------------------------------------------------------------------------------------- oracles


def ort_oracle(proto: onnx.ModelProto) -> Oracle:
    """The original ONNX model run by ONNX Runtime (CPU): inputs (arrays or CPU tensors) by name,
    outputs in graph order."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in proto.graph.input]

    def run(inputs: Inputs) -> list[np.ndarray]:
        return session.run(None, {name: np.asarray(inputs[name]) for name in names})

    return run


def torch_oracle(module: torch.nn.Module) -> Oracle:
    """The original PyTorch module (inference mode, keyword inputs): its output tensors as arrays."""

    def run(inputs: Inputs) -> list[np.ndarray]:
        with torch.inference_mode():
            out = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
        if hasattr(out, "sample"):  # diffusers output classes
            out = out.sample
        outputs = [out] if isinstance(out, torch.Tensor) else list(out)
        return [o.numpy() for o in outputs]

    return run


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max absolute difference relative to the max magnitude of the reference ``b``."""
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 error of ``a`` against the reference ``b``."""
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-12))


def _cell_bounds(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``n_out`` output rows, the input rows [start, end) it covers (at least one)."""
    starts = np.arange(n_out) * n_in // n_out
    ends = np.maximum(starts + 1, -(-np.arange(1, n_out + 1) * n_in // n_out))
    return starts, ends


def region_of(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """The pixel mask ``[B, H, W]`` (or ``[H, W]``) at the resolution of an output of ``shape``
    ``[B, C, h, w]``: an output pixel is in the region if any mask pixel it covers is (nearest
    for upsampled outputs). Returns a boolean ``[B, 1, h, w]`` array."""
    mask = np.asarray(mask, bool)
    if mask.ndim == 2:
        mask = mask[None]
    counts = np.pad(mask.astype(np.int64).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))  # summed-area table
    y0, y1 = _cell_bounds(shape[-2], mask.shape[1])
    x0, x1 = _cell_bounds(shape[-1], mask.shape[2])
    inside = (counts[:, y1[:, None], x1[None, :]] - counts[:, y0[:, None], x1[None, :]]
              - counts[:, y1[:, None], x0[None, :]] + counts[:, y0[:, None], x0[None, :]])
    return (inside > 0)[:, None]


def rel_l2_in(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Relative L2 error of ``a`` against ``b`` counting only the pixels of ``region``."""
    region = np.broadcast_to(region, b.shape)
    return rel_l2(a[region], b[region])


@dataclass
class OracleComparison:
    """One edit measured against the oracle. Errors are the worst over the outputs; "stale" is the
    error of not recomputing at all (the primed outputs against the oracle on the edited inputs);
    "inside" errors count only the edited region (the pixel mask resampled to each output)."""

    path: str  # engine.stats.path of the run
    primed: float  # rel_err(prime(original), oracle(original))
    dense: float  # rel_err(run_dense(edited), oracle(edited))
    sparse: float  # rel_err(run(edited), oracle(edited))
    stale: float  # rel_err(primed outputs, oracle(edited))
    sparse_l2: float
    stale_l2: float
    sparse_l2_inside: float
    stale_l2_inside: float
    outputs: list[np.ndarray]  # what run returned

    def __str__(self) -> str:
        return (f"path {self.path}: primed {self.primed:.2e}, dense {self.dense:.2e}, sparse {self.sparse:.2e} "
                f"(not recomputing {self.stale:.2e}); rel. L2 sparse {self.sparse_l2:.3e} / not recomputing "
                f"{self.stale_l2:.3e}; inside the edit {self.sparse_l2_inside:.3e} / {self.stale_l2_inside:.3e}")


def compare_with_oracle(engine: Engine, oracle: Oracle, original: Inputs, edited: Inputs,
                        mask: np.ndarray | None = None, *, run_mask: bool = True, key: Any = None) -> OracleComparison:
    """Prime ``engine`` on ``original``, run ``edited`` (with ``mask`` when ``run_mask``, else the
    engine computes it) and measure prime, run and run_dense against ``oracle``.

    ``mask`` ([H, W] or [B, H, W]) also defines the edited region; when None it is where any
    spatial input changed."""
    if mask is None:
        spatial = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
        mask = np.logical_or.reduce([np.abs(edited[k] - original[k]).max(axis=1) > 0 for k in spatial])
    expected_original, expected = oracle(original), oracle(edited)
    primed = engine.prime(original, key=key)
    outputs = engine.run(edited, mask=mask if run_mask else None, key=key)
    path = engine.stats.path
    dense = engine.run_dense(edited)
    regions = [region_of(mask, e.shape) for e in expected]
    return OracleComparison(
        path=path,
        primed=max(rel_err(p, e) for p, e in zip(primed, expected_original)),
        dense=max(rel_err(d, e) for d, e in zip(dense, expected)),
        sparse=max(rel_err(s, e) for s, e in zip(outputs, expected)),
        stale=max(rel_err(p, e) for p, e in zip(primed, expected)),
        sparse_l2=max(rel_l2(s, e) for s, e in zip(outputs, expected)),
        stale_l2=max(rel_l2(p, e) for p, e in zip(primed, expected)),
        sparse_l2_inside=max(rel_l2_in(s, e, r) for s, e, r in zip(outputs, expected, regions)),
        stale_l2_inside=max(rel_l2_in(p, e, r) for p, e, r in zip(primed, expected, regions)),
        outputs=outputs)


def assert_exact(c: OracleComparison, *, path: str = "sparse", min_change: float = 100 * EXACT_TOLERANCE,
                 context: str = "") -> None:
    """Exact mode: prime, run_dense and the run (on ``path``) equal the oracle to EXACT_TOLERANCE,
    and the edit changes the output by more than ``min_change`` (by default 100x the tolerance, so
    that not recomputing fails)."""
    assert c.path == path, f"{context}: expected the {path} path, got {c.path}"
    assert c.primed <= EXACT_TOLERANCE and c.dense <= EXACT_TOLERANCE, f"{context}: {c}"
    assert c.sparse <= EXACT_TOLERANCE, f"{context}: run differs from the oracle: {c}"
    assert c.stale >= min_change, f"{context}: the edit must change the output for the check to bite: {c}"


def assert_approx(c: OracleComparison, *, inside: float, whole: float, context: str = "") -> None:
    """Approx mode: prime and run_dense equal the oracle (they run the dense model); the sparse run's
    relative L2 error is at most ``inside`` (< 1) times the error of not recomputing inside the
    edited region and ``whole`` (<= 1) times it over the whole output, and below it in any case,
    so that not recomputing fails."""
    assert inside < 1 and whole <= 1, "a bound must reject not recomputing"
    assert c.path == "sparse", f"{context}: expected the sparse path, got {c.path}"
    assert c.primed <= EXACT_TOLERANCE and c.dense <= EXACT_TOLERANCE, f"{context}: {c}"
    assert c.stale_l2_inside > 100 * EXACT_TOLERANCE, f"{context}: the edit must change the output: {c}"
    assert c.sparse_l2_inside <= inside * c.stale_l2_inside, f"{context}: inside the edit: {c}"
    assert c.sparse_l2 <= whole * c.stale_l2 and c.sparse_l2 < c.stale_l2, f"{context}: whole output: {c}"


# ---------------------------------------------------------------------------------------------- test models


RANDOM_NET_APPROX_INSIDE = 0.9
"""Approx mode on random local nets: the largest sparse error inside the edit, as a fraction of not
recomputing's (measured worst 0.73 on 571 draws; see test_oracle_random_nets.py)."""

LOCAL_NET: dict[str, Any] = {"seed": 7, "depth": 6, "size": (20, 20)}
"""The random local net compiled once per session (conftest ``local_net_path``): ``random_local_net(**LOCAL_NET)``."""



ZOO_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny_local": ("tiny_local", {}),
    "spade": ("spade", {}),
    "resnet9_batch": ("resnet9", {"norm": "batch"}),
    "resnet9_instance": ("resnet9", {"norm": "instance"}),
    "ddpm_unet": ("ddpm_unet", {}),
    "sd_vae_decoder": ("sd_vae_decoder", {}),
}
"""Test variants of the zoo models (all built with ``small=True``): name -> (zoo model, build kwargs)."""


@dataclass(frozen=True)
class ZooModel:
    """A small zoo model, its example inputs and its ONNX export (what sigec compiles and the oracle runs)."""

    variant: str
    module: torch.nn.Module
    example: dict[str, torch.Tensor]
    proto: onnx.ModelProto

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self.example.items()}


# ---------------------------------------------------------------------------------------------- sparse op inputs


ACT_PARAMS = {"leaky_relu": (0.1, 0.0), "hard_sigmoid": (0.2, 0.5), "clip": (-0.5, 0.7)}
"""(alpha, beta) of the TileGather activations that take parameters."""

GATHER_INPUTS = ("base", "vals", "grid", "coords", "scale", "shift")

LOW_PRECISION = {  # dtype: (rtol/atol against the rounded float32 reference, against the reference in that dtype)
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (1.6e-2, 5e-2),
}

Cell = tuple[int, int, int]


def all_cells(batch: int, grid_h: int, grid_w: int, keep: Callable[[int, int, int], bool] = lambda b, y, x: True
              ) -> list[Cell]:
    """Every tile cell (b, y, x) of a [batch, grid_h, grid_w] grid for which ``keep`` holds."""
    return [(b, y, x) for b in range(batch) for y in range(grid_h) for x in range(grid_w) if keep(b, y, x)]


def coords_of(cells: Iterable[Cell]) -> np.ndarray:
    """Tile coordinates [N, 3] int64, sorted."""
    return np.array(sorted(cells), np.int64).reshape(-1, 3)


def sparse_input(rng: np.random.Generator, batch: int, channels: int, height: int, width: int, tile: int,
                 cells: Iterable[Cell] | None = None, frac: float = 0.0) -> dict[str, np.ndarray]:
    """A sparse map: ``base`` [B, C, H, W], ``vals`` [N, C, T, T], ``grid`` [B, gh, gw] (slot or -1)
    and ``coords`` [N, 3] of the active cells: ``cells``, or a random fraction ``frac`` of them."""
    gh, gw = -(-height // tile), -(-width // tile)
    if cells is None:
        cells = [tuple(int(v) for v in c) for c in np.argwhere(rng.random((batch, gh, gw)) < frac)]
    coords = coords_of(set(cells))
    grid = np.full((batch, gh, gw), -1, np.int64)
    grid[tuple(coords.T)] = np.arange(len(coords))
    return {"base": rng.standard_normal((batch, channels, height, width)).astype(np.float32),
            "vals": rng.standard_normal((len(coords), channels, tile, tile)).astype(np.float32),
            "grid": grid, "coords": coords}


def conv_attrs(tile: int) -> dict[str, list[int]]:
    """TileGather attributes of a 3x3 stride-1 pad-1 convolution on T x T output tiles."""
    return {"window": [tile + 2, tile + 2], "step": [tile, tile], "offset": [-1, -1]}


def check_gather(kernel: Callable[..., torch.Tensor], base: Any, vals: Any = None, grid: Any = None,
                 coords: Any = None, scale: Any = None, shift: Any = None, **attrs: Any) -> torch.Tensor:
    """Run a TileGather ``kernel`` (the signature of ``reference_ops.tile_gather``; arrays or tensors)
    and compare it with the reference; return its result.

    float32: to 1e-6. float16/bfloat16 (computed in float32, rounded once): against the float32
    reference rounded to the dtype (2 ulps) and against the reference run in that dtype."""
    args = [None if a is None else torch.as_tensor(a) for a in (base, vals, grid, coords, scale, shift)]
    base_t = args[0]
    out = kernel(*args, **attrs)
    expected = reference_ops.tile_gather(*args, **attrs)
    assert out.shape == expected.shape and out.dtype == base_t.dtype and out.device == base_t.device
    if base_t.dtype in LOW_PRECISION:
        tight, loose = LOW_PRECISION[base_t.dtype]
        up = [t.float() if t is not None and t.is_floating_point() else t for t in args]
        rounded = reference_ops.tile_gather(*up, **attrs).to(base_t.dtype)
        torch.testing.assert_close(out, rounded, rtol=tight, atol=tight, equal_nan=True)
        torch.testing.assert_close(out, expected, rtol=loose, atol=loose, equal_nan=True)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6, equal_nan=True)
    return out


# ---------------------------------------------------------------------------------------------- hypothesis


CI_MAX_EXAMPLES = 100  # max_examples of the "ci" profile (tests/conftest.py)


def examples(ci: int) -> int:
    """A property test's example count: ``ci`` under the "ci" profile, scaled by the loaded profile's
    max_examples (the "sweep" profile runs many more)."""
    return max(1, ci * settings().max_examples // CI_MAX_EXAMPLES)


# ---------------------------------------------------------------------------------------------- tools, processes


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` as a module."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def run_without_interpreter(script: str, timeout: int) -> subprocess.CompletedProcess:
    """Run a Python script in a fresh process with Triton's real compiler (no TRITON_INTERPRET): compiling
    kernels ahead of time for a GPU does not need one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------- serving


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_spade_engine(tmp_path_factory: Any) -> Path:
    """The small SPADE engine file (approx mode), compiled once per test session for the serving tests."""
    import sigec
    from sigec.apps import zoo

    path = tmp_path_factory.getbasetemp() / "sigec_serve" / "spade_small.sigec"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        module, inputs = zoo.build("spade", small=True)
        sigec.compile(module, path, inputs=inputs, mode="approx", progress=False)
    return path
