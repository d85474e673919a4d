"""Fixed cost per run: where the wall time of ``engine.run`` goes besides ONNX Runtime's kernels.

Usage:
    python tools/run_overhead.py [--models tiny_local resnet9] [--edits 0 0.002 0.012] [--runs 7]
                                 [--threads 2] [--mode approx] [--engine-dir DIR] [--variants bound unbound]

For each zoo model (full size; compiled into ``--engine-dir`` unless the engine file is already
there) and each edit (a centred square of that fraction of the image, noise added inside; 0 is an
empty edit) it measures, side by side in one process, alternating run by run:

- the wall time of ``engine.run(edited, mask=square)`` for every variant: ``bound`` (caches bound
  to the SPARSE session once, the default) and ``unbound`` (every cache fed by name on every run,
  ``Engine(bind_caches=False)``); ``default`` builds the engine without that argument (for older
  code that lacks it);
- the wall time of ``engine.run_dense(edited)``;
- how much of it ``session.run`` (or ``run_with_iobinding``) took, and the engine's own phases
  (``RunStats.phases_ms``: validate, wait, mask, tiles, feeds, execute, finish);
- with a separate, profiled engine: the sum of ONNX Runtime's kernel times per run and its
  ``model_run`` time (kernels plus the executor's own work).

Prints medians of ``--runs`` runs as markdown tables: overhead is wall minus kernel sum, split into
Python (wall minus session) and ONNX Runtime outside kernels (model_run minus kernel sum, measured
on the profiled engine); ratio is dense wall over sparse wall; MAC reduction is the engine's.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import onnx

from sigec.core.engine_file import read_engine
from sigec.runtime.backends import make_runners
from sigec.runtime.engine import Engine
from sigec.runtime.synthetic_edits import edit_inputs, random_inputs, square_mask

VARIANTS = ("bound", "unbound", "default")


class TimedSession:
    """Wraps an ONNX Runtime session; records how long each ``run`` / ``run_with_iobinding`` took."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.last_ms = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def _timed(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            self.last_ms = (time.perf_counter() - start) * 1e3

    def run(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._session.run, *args, **kwargs)

    def run_with_iobinding(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(self._session.run_with_iobinding, *args, **kwargs)


@dataclass
class Samples:
    """Per-run measurements of one (edit, variant)."""

    wall: list[float] = field(default_factory=list)
    session: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    path: str = ""

    def median_phases(self) -> dict[str, float]:
        names = sorted({k for p in self.phases for k in p})
        return {k: statistics.median(p.get(k, 0.0) for p in self.phases) for k in names}


def build_engine(contents: Any, threads: int, variant: str, profile: Mapping[str, str] | None = None) -> Engine:
    """An engine on ONNX Runtime with timed SPARSE and DENSE sessions."""
    graphs = {k: onnx.ModelProto.FromString(v) for k, v in contents.graphs.items()}
    runners = make_runners("ort", graphs, contents.weights, threads=threads, profile=profile)
    for name in ("sparse", "dense"):
        runners[name].session = TimedSession(runners[name].session)
    options: dict[str, Any] = {}
    if variant != "default":
        if "bind_caches" not in inspect.signature(Engine).parameters:
            raise SystemExit(f"variant {variant!r} needs Engine(bind_caches=...); use --variants default")
        options["bind_caches"] = variant == "bound"
    return Engine(contents.manifest, runners, **options)


def kernel_runs(profile_path: str) -> list[tuple[float, float]]:
    """(kernel sum ms, model_run ms) of every run in an ONNX Runtime profile, in order."""
    with open(profile_path) as handle:
        events = json.load(handle)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    sums = [0.0] * len(runs)
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        for i, (begin, end) in enumerate(runs):
            if begin <= e["ts"] <= end:
                sums[i] += e["dur"] / 1e3
                break
    return [(s, (end - begin) / 1e3) for s, (begin, end) in zip(sums, runs)]


def engine_file(model: str, mode: str, directory: Path) -> Path:
    """The full-size zoo model's engine in ``directory``, compiled if absent."""
    path = directory / f"{model}_{mode}.sigec"
    if not path.exists():
        import sigec
        from sigec.apps import zoo

        module, example = zoo.build(model)
        directory.mkdir(parents=True, exist_ok=True)
        sigec.compile(module, path, inputs=example, mode=mode)
    return path


def measure(path: Path, edits: list[float], runs: int, threads: int, variants: list[str]) -> dict[str, Any]:
    """Every measurement of one engine (see the module docstring)."""
    contents = read_engine(path)
    manifest = contents.manifest
    engines = {v: build_engine(contents, threads, v) for v in variants}
    height, width = manifest["mask_program"]["input_size"]
    spatial = [i["name"] for i in manifest["inputs"] if i["spatial"]]
    original = random_inputs(manifest, seed=0)
    for engine in engines.values():
        engine.prime(original)
    first = engines[variants[0]]
    dense_session: TimedSession = first._runners["dense"].session
    result: dict[str, Any] = {"nodes": len(manifest.get("nodes", [])),
                              "sparse_inputs": len(first._runners["sparse"].input_names), "edits": {}}
    cases = []
    for edit in edits:
        mask = square_mask(height, width, edit)
        cases.append((edit, mask, edit_inputs(original, spatial, mask)))
    for edit, mask, edited in cases:
        samples = {v: Samples() for v in variants}
        dense = Samples()
        for engine in engines.values():  # warm-up (the first bound run makes the bindings)
            engine.run(edited, mask=mask)
            engine.run(edited, mask=mask)
        first.run_dense(edited)
        for _ in range(runs):
            for variant, engine in engines.items():
                session: TimedSession = engine._runners["sparse"].session
                session.last_ms = 0.0
                start = time.perf_counter()
                engine.run(edited, mask=mask)
                s = samples[variant]
                s.wall.append((time.perf_counter() - start) * 1e3)
                s.path = engine.stats.path
                s.session.append(session.last_ms if s.path == "sparse" else 0.0)
                s.phases.append(dict(getattr(engine.stats, "phases_ms", {})))
            start = time.perf_counter()
            first.run_dense(edited)
            dense.wall.append((time.perf_counter() - start) * 1e3)
            dense.session.append(dense_session.last_ms)
        result["edits"][edit] = {"samples": samples, "dense": dense, "mac_reduction": first.stats.mac_reduction,
                                 "active_tiles": dict(first.stats.active_tiles)}
    del engines, first
    # Kernel sums: a separate engine with ONNX Runtime's profiler on (its overhead stays out of the walls).
    with tempfile.TemporaryDirectory(prefix="sigec-overhead-") as tmp:
        prefixes = {"sparse": os.path.join(tmp, "sparse"), "dense": os.path.join(tmp, "dense")}
        profiled = build_engine(contents, threads, variants[0], profile=prefixes)
        profiled.prime(original)
        order: dict[str, list[float]] = {"sparse": [], "dense": []}
        for edit, mask, edited in cases:
            for _ in range(runs):
                profiled.run(edited, mask=mask)
                if profiled.stats.path != "empty":
                    order["sparse" if profiled.stats.path == "sparse" else "dense"].append(edit)
                profiled.run_dense(edited)
                order["dense"].append(-1.0 - edit)  # dense runs of edit e are tagged -1 - e
        per_edit: dict[tuple[str, float], list[tuple[float, float]]] = {}
        for graph in ("sparse", "dense"):
            measured = kernel_runs(profiled._runners[graph].session.end_profiling())
            for tag, run in zip(order[graph], measured):
                per_edit.setdefault((graph, tag), []).append(run)
    for edit in edits:
        entry = result["edits"][edit]
        sparse_runs = per_edit.get(("sparse", edit), [])
        dense_runs = per_edit.get(("dense", -1.0 - edit), [])
        entry["kernel_ms"] = statistics.median(k for k, _ in sparse_runs) if sparse_runs else 0.0
        entry["model_run_ms"] = statistics.median(m for _, m in sparse_runs) if sparse_runs else 0.0
        entry["dense_kernel_ms"] = statistics.median(k for k, _ in dense_runs)
    return result


def report(model: str, result: dict[str, Any], variants: list[str]) -> str:
    """Markdown tables of one model's measurements."""
    lines = [f"### {model} (SPARSE graph: {result['nodes']} nodes in the manifest, {result['sparse_inputs']} inputs)",
             "", "| edit | path | variant | wall ms | kernel sum ms | overhead ms | of which Python ms | of which ORT "
             "outside kernels ms | dense wall ms | dense kernel ms | dense / sparse wall | MAC reduction |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    phase_lines = ["", "Python-side phases (median ms; execute includes session.run, shown separately):", "",
                   "| edit | variant | validate | wait | mask | tiles | feeds | execute - session | session.run | finish |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
    for edit, entry in result["edits"].items():
        dense_wall = statistics.median(entry["dense"].wall)
        for variant in variants:
            s: Samples = entry["samples"][variant]
            wall, session = statistics.median(s.wall), statistics.median(s.session)
            kernel = entry["kernel_ms"] if s.path == "sparse" else 0.0
            ort_side = max(entry["model_run_ms"] - kernel, 0.0) if s.path == "sparse" else 0.0
            macs = f"{entry['mac_reduction']:.1f}x" if s.path == "sparse" else "-"
            lines.append(f"| {edit:.1%} | {s.path} | {variant} | {wall:.2f} | {kernel:.2f} | {wall - kernel:.2f} | "
                         f"{wall - session:.2f} | {ort_side:.2f} | {dense_wall:.1f} | {entry['dense_kernel_ms']:.1f} | "
                         f"{dense_wall / wall:.1f}x | {macs} |")
            p = s.median_phases()
            if p:
                cells = [p.get(k, 0.0) for k in ("validate", "wait", "mask", "tiles", "feeds")]
                bind = max(p.get("execute", 0.0) - session, 0.0)
                phase_lines.append(f"| {edit:.1%} | {variant} | " + " | ".join(f"{c:.2f}" for c in cells) +
                                   f" | {bind:.2f} | {session:.2f} | {p.get('finish', 0.0):.2f} |")
    return "\n".join(lines + (phase_lines if len(phase_lines) > 5 else []))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny_local", "resnet9"])
    parser.add_argument("--mode", default="approx", choices=["exact", "approx"])
    parser.add_argument("--edits", nargs="+", type=float, default=[0.0, 0.002, 0.012])
    parser.add_argument("--runs", type=int, default=7, help="measured runs per edit and variant (medians)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--variants", nargs="+", default=["bound", "unbound"], choices=VARIANTS)
    parser.add_argument("--engine-dir", type=Path, default=Path(tempfile.gettempdir()) / "sigec-run-overhead",
                        help="where engine files are compiled to (or found)")
    args = parser.parse_args(argv)
    if args.runs < 1 or any(not 0.0 <= e <= 1.0 for e in args.edits):
        parser.error("--runs must be at least 1 and --edits lie in [0, 1]")
    print(f"{args.threads} threads, {args.runs} runs per edit (medians), mode {args.mode}, "
          f"variants {', '.join(args.variants)}", flush=True)
    for model in args.models:
        path = engine_file(model, args.mode, args.engine_dir)
        result = measure(path, args.edits, args.runs, args.threads, args.variants)
        print("\n" + report(model, result, args.variants), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
