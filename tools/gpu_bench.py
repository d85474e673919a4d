"""Benchmark sigec on a GPU: dense PyTorch (cuDNN) vs sigec sparse with the Triton kernels.

Usage: python tools/gpu_bench.py --out OUTDIR [--models ddpm_unet_small,ddpm_unet,spade]
       [--edits 0.012,0.05,0.2] [--precisions fp32,fp16] [--repeats 10] [--device cuda] [--budget-s 400]
       [--tile-size T]

For every model the script compiles an engine (``backend="torch"``, on the CPU), then per
precision and edit size (a centred square; noise for the UNet, relabelled classes for SPADE) it
times, after warm-up runs (Triton compilation, cuDNN autotuning) and with the device synchronised
around every run, the medians of:

- dense PyTorch: the ``nn.Module`` on the device (cuDNN);
- dense executor: the engine's DENSE graph in sigec's PyTorch executor (its overhead without sparsity);
- sparse Triton (resident): mask program + tile index upload + the SPARSE graph, caches kept on the
  device (how a GPU deployment would hold them), Triton gathers/scatters;
- sparse reference: the same with the PyTorch reference gathers (``SIGEC_TRITON=0``);
- engine.run: the public API (``sigec.load(..., backend="torch", device=...)``): caches uploaded to
  the device by the first run and reused (runtime/device_mirror.py); inputs, mask program and the
  output copy back to the host included (fp32 only).

``fp16`` runs the executor and the module under ``torch.autocast`` (convolutions and matrix
products in half precision, caches and other ops in float32); priming always runs in float32.
The relative L2 error is the sparse output against the dense float32 PyTorch output of the same
edited input. Writes OUTDIR/gpu_bench.md and OUTDIR/gpu_bench.json; a model that fails or does
not fit the time budget gets a row saying why, and the others go on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import onnx
import torch

import sigec
from sigec.runtime.synthetic_edits import square_mask
from sigec.core.engine_file import read_engine
from sigec.runtime.backends import make_runners
from sigec.runtime.engine import Engine
from sigec.apps.zoo import build, edit_label_map


@dataclass(frozen=True)
class ModelSpec:
    """A zoo model and how to compile and edit it."""

    zoo_name: str
    small: bool
    mode: str
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    edit: str = "noise"  # "noise" in a square, or "labels" (SPADE: the square relabelled)


MODELS: dict[str, ModelSpec] = {
    "ddpm_unet_small": ModelSpec("ddpm_unet", True, "approx"),
    "ddpm_unet": ModelSpec("ddpm_unet", False, "approx"),
    "spade_small": ModelSpec("spade", True, "exact", edit="labels"),
    "spade": ModelSpec("spade", False, "exact", edit="labels"),
}
PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Row:
    """One (model, precision, edit) measurement; times in ms, ``None`` where not measured."""

    model: str
    precision: str
    edit: float
    mac_reduction: float | None = None
    dense_torch_ms: float | None = None
    dense_executor_ms: float | None = None
    sparse_triton_ms: float | None = None
    sparse_reference_ms: float | None = None
    engine_run_ms: float | None = None
    engine_path: str | None = None
    rel_l2: float | None = None
    rel_l2_vs_fp32_sparse: float | None = None  # low precision only (target: <= 1e-2 in fp16)
    note: str = ""

    @property
    def speedup(self) -> float | None:
        """Dense PyTorch time over sparse (Triton, resident) time."""
        if self.dense_torch_ms is None or not self.sparse_triton_ms:
            return None
        return self.dense_torch_ms / self.sparse_triton_ms


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms, the device synchronised before and after each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for a reduced precision, or nothing for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def sigec_triton(value: str) -> Iterator[None]:
    """Set ``SIGEC_TRITON`` (read by the executor's ai.sigec dispatch on every call) for a block."""
    old = os.environ.get("SIGEC_TRITON")
    os.environ["SIGEC_TRITON"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SIGEC_TRITON", None)
        else:
            os.environ["SIGEC_TRITON"] = old


# ---------------------------------------------------------------------------------------------- sparse runs


class ResidentSparse:
    """The SPARSE graph run with its caches held on the device (primed once, in float32)."""

    def __init__(self, engine: Engine, runners: Mapping[str, Any], device: torch.device) -> None:
        self.engine, self.device = engine, device
        self.full, self.sparse = runners["full"].executor, runners["sparse"].executor
        self.output = engine.manifest["outputs"][0]["name"]
        self.caches: dict[str, torch.Tensor] = {}

    def to_device(self, arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device) for k, v in arrays.items()}

    def prime(self, original: Mapping[str, np.ndarray]) -> None:
        """Run FULL once and keep every cache the SPARSE graph reads on the device."""
        caches = self.engine.manifest["caches"]
        out = self.full.run(self.to_device(original), sorted({c["source"] for c in caches}))
        self.caches = {c["name"]: out[c["source"]] for c in caches}

    def run(self, edited: Mapping[str, torch.Tensor], mask: np.ndarray) -> torch.Tensor:
        """Mask program (host), tile index upload, SPARSE graph; the output stays on the device."""
        _, _, tiles = self.engine.expected_macs(mask)
        feeds: dict[str, Any] = {**edited, **self.caches}
        for name, index in tiles.items():
            feeds[f"tiles::coords::{name}"] = torch.from_numpy(index.coords).to(self.device)
            feeds[f"tiles::grid::{name}"] = torch.from_numpy(index.grid).to(self.device)
        wanted = set(self.sparse.input_names)
        return self.sparse.run({k: v for k, v in feeds.items() if k in wanted}, [self.output])[self.output]


def load_engine(path: pathlib.Path, device: torch.device) -> tuple[Engine, Mapping[str, Any]]:
    """``sigec.load(path, backend="torch", device=device)``, keeping hold of the runners."""
    contents = read_engine(path)
    graphs = {name: onnx.ModelProto.FromString(contents.graphs[name]) for name in ("full", "sparse", "dense")}
    runners = make_runners("torch", graphs, contents.weights, device=str(device))
    return Engine(contents.manifest, runners, path=str(path), dense_fallback_fraction=10.0), runners


def make_edit(spec: ModelSpec, original: Mapping[str, np.ndarray], spatial: str, mask: np.ndarray
              ) -> dict[str, np.ndarray]:
    """The original inputs with the square ``mask`` edited (noise, or SPADE labels relabelled)."""
    edited = dict(original)
    x0 = original[spatial]
    if spec.edit == "labels":
        rows, cols = np.nonzero(mask)
        box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
        new_class = int(np.argmin(x0[0, :, mask].sum(axis=1)))  # a class (nearly) absent from the box
        edited[spatial] = edit_label_map(torch.from_numpy(x0), box, new_class).numpy()
    else:
        noise = np.random.default_rng(1).standard_normal(x0.shape).astype(x0.dtype) * 0.5
        edited[spatial] = x0 + noise * mask
    return edited


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / (torch.linalg.vector_norm(b) + 1e-12))


# ---------------------------------------------------------------------------------------------- one model


def bench_model(name: str, spec: ModelSpec, edits: list[float], precisions: list[str], device: torch.device,
                repeats: int, workdir: pathlib.Path, deadline: float, log: Callable[[str], None],
                tile_size: int | None = None) -> tuple[list[Row], dict[str, Any]]:
    """All rows of one model, and facts about it (compile time, MACs, cache size)."""
    module, example = build(spec.zoo_name, small=spec.small)
    path = workdir / f"{name}.sigec"
    start = time.perf_counter()
    sigec.compile(module, path, inputs=example, mode=spec.mode, backend="torch", tile_size=tile_size,
                  **spec.compile_kwargs)
    info: dict[str, Any] = {"compile_s": round(time.perf_counter() - start, 1), "mode": spec.mode,
                            "tile_size": tile_size or "default",
                            "input": {k: list(v.shape) for k, v in example.items()}}
    log(f"{name}: compiled in {info['compile_s']} s")
    engine, runners = load_engine(path, device)
    resident = ResidentSparse(engine, runners, device)
    dense_exec = runners["dense"].executor
    output = resident.output
    spatial = next(i["name"] for i in engine.manifest["inputs"] if i["spatial"])
    original = {k: v.numpy() for k, v in example.items()}
    module = module.to(device)
    resident.prime(original)
    info["dense_gmacs"] = round(engine.expected_macs(np.zeros(original[spatial].shape[-2:], bool))[0] / 1e9, 2)
    info["cache_mib"] = round(sum(t.numel() * t.element_size() for t in resident.caches.values()) / 2**20, 1)
    if "fp32" in precisions:
        engine.prime(original)
    rows = []
    height, width = original[spatial].shape[-2:]
    for precision in precisions:
        dtype = PRECISIONS[precision]
        for edit in edits:
            row = Row(name, precision, edit)
            rows.append(row)
            if time.monotonic() > deadline:
                row.note = "skipped: time budget spent"
                continue
            try:
                _measure(row, spec, engine, resident, dense_exec, module, original, spatial, output,
                         square_mask(height, width, edit), dtype, device, repeats)
            except Exception as exc:  # a failed measurement is reported, the others go on
                row.note = f"failed: {type(exc).__name__}: {str(exc)[:160]}"
                log(traceback.format_exc())
            log(f"{name} {precision} {edit * 100:.1f}%: {row}")
    return rows, info


def _measure(row: Row, spec: ModelSpec, engine: Engine, resident: ResidentSparse, dense_exec: Any,
             module: torch.nn.Module, original: Mapping[str, np.ndarray], spatial: str, output: str,
             mask: np.ndarray, dtype: torch.dtype | None, device: torch.device, repeats: int) -> None:
    """Fill one row: dense and sparse timings, MAC reduction, error against dense float32."""
    edited = make_edit(spec, original, spatial, mask)
    feeds = resident.to_device(edited)
    dense_macs, executed, _ = engine.expected_macs(mask)
    row.mac_reduction = dense_macs / max(executed, 1)
    with torch.inference_mode():
        reference = module(**feeds)
        with autocast(device, dtype):
            row.dense_torch_ms = median_ms(lambda: module(**feeds), device, repeats)
            row.dense_executor_ms = median_ms(lambda: dense_exec.run(feeds, [output]), device, repeats)
            with sigec_triton("1"):
                row.sparse_triton_ms = median_ms(lambda: resident.run(feeds, mask), device, repeats, warmup=2)
                sparse_out = resident.run(feeds, mask)
                row.rel_l2 = rel_l2(sparse_out, reference)
            try:
                with sigec_triton("0"):
                    row.sparse_reference_ms = median_ms(lambda: resident.run(feeds, mask), device, repeats)
            except Exception as exc:
                row.note = f"reference gathers failed: {type(exc).__name__}: {str(exc)[:120]}"
    if dtype is not None:
        with torch.inference_mode(), sigec_triton("1"):
            row.rel_l2_vs_fp32_sparse = rel_l2(sparse_out, resident.run(feeds, mask))
    if dtype is None:
        with sigec_triton("1"):
            row.engine_run_ms = median_ms(lambda: engine.run(edited, mask=mask), device, repeats)
        row.engine_path = engine.stats.path


# ---------------------------------------------------------------------------------------------- report


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows: list[Row], infos: Mapping[str, Any], header: list[str]) -> str:
    """The report: a header and one table of all rows."""
    lines = [*header, ""]
    for name, info in infos.items():
        lines.append(f"- `{name}`: {json.dumps(info)}")
    columns = ["model", "precision", "edit", "MAC reduction", "dense PyTorch ms", "dense executor ms",
               "sparse Triton ms", "speedup vs PyTorch", "sparse reference-gather ms", "engine.run ms (path)",
               "rel. L2 vs dense fp32", "rel. L2 vs sparse fp32", "note"]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        engine = "-" if r.engine_run_ms is None else f"{r.engine_run_ms:.1f} ({r.engine_path})"
        lines.append(f"| {r.model} | {r.precision} | {r.edit * 100:.1f}% | {_fmt(r.mac_reduction, '.2f', 'x')} | "
                     f"{_fmt(r.dense_torch_ms, '.2f')} | {_fmt(r.dense_executor_ms, '.2f')} | "
                     f"{_fmt(r.sparse_triton_ms, '.2f')} | {_fmt(r.speedup, '.2f', 'x')} | "
                     f"{_fmt(r.sparse_reference_ms, '.2f')} | {engine} | {_fmt(r.rel_l2, '.2e')} | "
                     f"{_fmt(r.rel_l2_vs_fp32_sparse, '.2e')} | {r.note} |")
    return "\n".join(lines) + "\n"


def describe(device: torch.device, repeats: int) -> list[str]:
    """Header lines: date, device, versions, settings."""
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return [
        "## sigec on GPU: dense PyTorch vs sparse with Triton kernels",
        "",
        f"Date {datetime.datetime.now().isoformat(timespec='seconds')}; device {name}; torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); triton {triton.__version__}.  ",
        f"Medians of {repeats} runs after warm-up, device synchronised around each; cudnn.benchmark "
        f"{torch.backends.cudnn.benchmark}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}, matmul TF32 "
        f"{torch.backends.cuda.matmul.allow_tf32}. Random weights; edits are centred squares.  ",
        "Sparse times include the mask program and the tile-index upload; caches stay on the device. "
        "engine.run keeps the caches on the device after its first run (the warm-up). fp16 = torch.autocast.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_bench.md and gpu_bench.json")
    parser.add_argument("--models", default="ddpm_unet_small,ddpm_unet,spade")
    parser.add_argument("--edits", default="0.012,0.05,0.2")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    parser.add_argument("--tile-size", type=int, default=None, help="output tile size (default: the compiler's)")
    parser.add_argument("--no-cudnn-benchmark", action="store_true")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    names = [m for m in args.models.split(",") if m]
    unknown = [m for m in names if m not in MODELS]
    precisions = [p for p in args.precisions.split(",") if p]
    if unknown or any(p not in PRECISIONS for p in precisions):
        print(f"gpu_bench: models must be among {sorted(MODELS)}, precisions among {sorted(PRECISIONS)}",
              file=sys.stderr)
        return 2
    edits = [float(e) for e in args.edits.split(",")]
    rows: list[Row] = []
    infos: dict[str, Any] = {}

    def log(message: str) -> None:
        print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {message}", flush=True)

    def write() -> None:
        text = markdown(rows, infos, describe(device, args.repeats))
        (out / "gpu_bench.md").write_text(text)
        (out / "gpu_bench.json").write_text(json.dumps({"models": infos, "rows": [
            {**asdict(r), "speedup": r.speedup} for r in rows]}, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            if time.monotonic() > deadline:
                infos[name] = {"skipped": "time budget spent"}
                continue
            try:
                model_rows, infos[name] = bench_model(name, MODELS[name], edits, precisions, device, args.repeats,
                                                      pathlib.Path(tmp), deadline, log, args.tile_size)
                rows.extend(model_rows)
            except ImportError as exc:
                infos[name] = {"skipped": f"{exc} (the UNet needs diffusers)"}
                log(f"{name}: skipped: {exc}")
            except Exception as exc:
                infos[name] = {"failed": f"{type(exc).__name__}: {str(exc)[:300]}"}
                log(traceback.format_exc())
            write()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    write()
    print((out / "gpu_bench.md").read_text())
    measured = [r for r in rows if r.sparse_triton_ms is not None]
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
