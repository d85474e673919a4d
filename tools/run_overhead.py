"""Fixed cost per run: where the wall time of ``engine.run`` goes besides ONNX Runtime's kernels.

Usage:
    python tools/run_overhead.py [--models tiny_local resnet9] [--edits 0 0.002 0.012] [--runs 7]
                                 [--threads 2] [--mode approx] [--engine-dir DIR] [--variants bound unbound]
                                 [--feeds 10 100 300]

For each zoo model (full size; compiled into ``--engine-dir`` unless the engine file is already
there) and each edit (a centred square of that fraction of the image, noise added inside; 0 is an
empty edit) it runs, side by side in one process and alternating run by run (the machine's load
drifts), every variant of the engine, each as an unprofiled engine and as a twin with ONNX
Runtime's profiler on, and the dense graph:

- variants: ``bound`` (caches bound to the SPARSE session once, the default), ``unbound`` (every
  cache fed by name on every run, ``Engine(bind_caches=False)``), ``default`` (the engine built
  without that argument: for older code that lacks it);
- unprofiled engine: wall time of ``engine.run(edited, mask=square)``, the time of its
  ``session.run`` / ``run_with_iobinding`` call, the engine's phases (``RunStats.phases_ms``);
- profiled twin, same inputs: wall time, sum of kernel times and ``model_run`` time per run;
  overhead (wall - kernel sum) and its split (outside ONNX Runtime: wall - model_run; ONNX
  Runtime between kernels: model_run - kernel sum) are medians of per-run differences, so both
  terms of a difference come from the same run; the profiler's own cost per node is included (in
  the overhead and in the per-run ratio profiled wall / kernel sum);
- dense: wall time of ``engine.run_dense(edited)`` and its kernel sum.

Prints markdown tables of medians of ``--runs`` runs; dense / sparse wall is the speedup, MAC
reduction the engine's. ``--feeds N ...`` adds the cost of feeding N cache inputs by name against
binding them once, on a graph without compute (what a SPARSE graph with hundreds of caches pays).
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
    """Per-run measurements of one (edit, variant) or of the dense runs of one edit."""

    wall: list[float] = field(default_factory=list)  # unprofiled engine
    session: list[float] = field(default_factory=list)  # its session.run / run_with_iobinding
    phases: list[dict[str, float]] = field(default_factory=list)
    profiled_wall: list[float] = field(default_factory=list)  # the profiled engine, same inputs
    kernel: list[float] = field(default_factory=list)  # its kernel sum per run
    model_run: list[float] = field(default_factory=list)  # its model_run per run
    path: str = ""

    def median(self, values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    def paired(self, a: list[float], b: list[float]) -> float:
        """Median over runs of a - b (both measured in the same run: the load's drift cancels)."""
        return statistics.median(x - y for x, y in zip(a, b)) if a and b else 0.0

    def ratio(self, a: list[float], b: list[float]) -> float:
        """Median over runs of a / b (both measured in the same run)."""
        return statistics.median(x / y for x, y in zip(a, b) if y > 0) if any(y > 0 for y in b) else 0.0

    def median_phases(self) -> dict[str, float]:
        names = sorted({k for p in self.phases for k in p})
        return {k: statistics.median(p.get(k, 0.0) for p in self.phases) for k in names}


def build_engine(contents: Any, threads: int, variant: str, profile: Mapping[str, str] | None = None) -> Engine:
    """An engine on ONNX Runtime with timed SPARSE and DENSE sessions."""
    graphs = {k: onnx.ModelProto.FromString(v) for k, v in contents.graphs.items()}
    runners = make_runners("ort", graphs, contents.weights, threads=threads, profile=profile, lazy=())
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


class Variant:
    """One way of running: an unprofiled engine for wall times and a profiled twin for kernel times."""

    def __init__(self, contents: Any, threads: int, variant: str, tmp: str) -> None:
        self.name = variant
        self.prefixes = {g: os.path.join(tmp, f"{variant}-{g}") for g in ("sparse", "dense")}
        self.engine = build_engine(contents, threads, variant)
        self.profiled = build_engine(contents, threads, variant, profile=self.prefixes)
        self.tags: dict[str, list[Any]] = {"sparse": [], "dense": []}  # what each profiled run measured

    def prime(self, inputs: Mapping[str, np.ndarray]) -> None:
        self.engine.prime(inputs)
        self.profiled.prime(inputs)

    def run(self, edited: Mapping[str, np.ndarray], mask: np.ndarray, tag: Any, samples: Samples | None) -> None:
        """One sparse run of each engine (``samples`` None: a warm-up)."""
        session: TimedSession = self.engine._runners["sparse"].session
        session.last_ms = 0.0
        start = time.perf_counter()
        self.engine.run(edited, mask=mask)
        wall = (time.perf_counter() - start) * 1e3
        stats = self.engine.stats
        start = time.perf_counter()
        self.profiled.run(edited, mask=mask)
        profiled_wall = (time.perf_counter() - start) * 1e3
        if self.profiled.stats.path != "empty":
            self.tags["sparse" if self.profiled.stats.path == "sparse" else "dense"].append(tag if samples else None)
        if samples is not None:
            samples.wall.append(wall)
            samples.session.append(session.last_ms if stats.path == "sparse" else 0.0)
            samples.phases.append(dict(getattr(stats, "phases_ms", {})))
            samples.profiled_wall.append(profiled_wall)
            samples.path = stats.path

    def run_dense(self, edited: Mapping[str, np.ndarray], tag: Any, samples: Samples) -> None:
        session: TimedSession = self.engine._runners["dense"].session
        start = time.perf_counter()
        self.engine.run_dense(edited)
        samples.wall.append((time.perf_counter() - start) * 1e3)
        samples.session.append(session.last_ms)
        start = time.perf_counter()
        self.profiled.run_dense(edited)
        samples.profiled_wall.append((time.perf_counter() - start) * 1e3)
        self.tags["dense"].append(tag)

    def collect(self, samples: Mapping[Any, Samples]) -> None:
        """Add the kernel sums and model_run times of the profiled runs to the samples they belong to."""
        for graph in ("sparse", "dense"):
            measured = kernel_runs(self.profiled._runners[graph].session.end_profiling())
            for tag, (kernel, model_run) in zip(self.tags[graph], measured):
                if tag is not None and tag in samples:
                    samples[tag].kernel.append(kernel)
                    samples[tag].model_run.append(model_run)


def measure(path: Path, edits: list[float], runs: int, threads: int, variants: list[str]) -> dict[str, Any]:
    """Every measurement of one engine (see the module docstring): samples by (edit, variant or "dense")."""
    contents = read_engine(path)
    manifest = contents.manifest
    height, width = manifest["mask_program"]["input_size"]
    spatial = [i["name"] for i in manifest["inputs"] if i["spatial"]]
    original = random_inputs(manifest, seed=0)
    samples: dict[tuple[float, str], Samples] = {}
    info: dict[str, Any] = {"nodes": len(manifest.get("nodes", [])), "mac_reduction": {}}
    with tempfile.TemporaryDirectory(prefix="sigec-overhead-") as tmp:
        ways = [Variant(contents, threads, v, tmp) for v in variants]
        for way in ways:
            way.prime(original)
        info["sparse_inputs"] = len(ways[0].engine._runners["sparse"].input_names)
        for edit in edits:
            mask = square_mask(height, width, edit)
            edited = edit_inputs(original, spatial, mask)
            for way in ways:
                samples[edit, way.name] = Samples()
                for _ in range(2):  # warm-up (the first bound run makes the bindings)
                    way.run(edited, mask, None, None)
            samples[edit, "dense"] = Samples()
            for i in range(runs):  # alternate everything run by run: the machine's load drifts
                for way in ways[i % len(ways):] + ways[:i % len(ways)]:  # each variant goes first in turn
                    way.run(edited, mask, (edit, way.name), samples[edit, way.name])
                ways[0].run_dense(edited, (edit, "dense"), samples[edit, "dense"])
            info["mac_reduction"][edit] = ways[0].engine.stats.mac_reduction if edit else 0.0
        for way in ways:
            way.collect(samples)
    info["samples"] = samples
    return info


def _ratio(value: float) -> str:
    return f"{value:.2f}x" if value > 0 else "-"


def report(model: str, result: dict[str, Any], edits: list[float], variants: list[str]) -> str:
    """Markdown tables of one model's measurements."""
    samples: dict[tuple[float, str], Samples] = result["samples"]
    lines = [f"### {model} (SPARSE graph: {result['nodes']} nodes in the manifest, {result['sparse_inputs']} inputs)",
             "", "Medians; *overhead* = wall - kernel sum and its split are medians of per-run differences on the "
             "profiled engine (*outside ORT* = wall - model_run: Python and the feed / binding calls; *ORT between "
             "kernels* = model_run - kernel sum). *profiled wall / kernel sum*: the median per-run ratio on the "
             "profiled engine (the profiler's own cost per node included).", "",
             "| edit | path | variant | wall ms | kernel sum ms | overhead ms | outside ORT ms | ORT between kernels ms "
             "| profiled wall ms | profiled wall / kernel sum | dense wall ms | dense kernel ms | dense / sparse wall "
             "| MAC reduction |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    phase_lines = ["", "Python-side phases of the unprofiled engine (medians, ms; *execute* is split into the "
                   "session call and the rest: binding, output conversion):", "",
                   "| edit | variant | validate | wait | mask | tiles | feeds | execute: session | execute: rest | finish |",
                   "|---|---|---|---|---|---|---|---|---|---|"]
    for edit in edits:
        dense = samples[edit, "dense"]
        dense_wall = dense.median(dense.wall)
        for variant in variants:
            s = samples[edit, variant]
            wall = s.median(s.wall)
            overhead = s.paired(s.profiled_wall, s.kernel) if s.kernel else s.median(s.profiled_wall)
            outside = s.paired(s.profiled_wall, s.model_run) if s.model_run else s.median(s.profiled_wall)
            between = s.paired(s.model_run, s.kernel)
            macs = f"{result['mac_reduction'][edit]:.1f}x" if s.path == "sparse" else "-"
            lines.append(f"| {edit:.1%} | {s.path} | {variant} | {wall:.2f} | {s.median(s.kernel):.2f} | {overhead:.2f} | "
                         f"{outside:.2f} | {between:.2f} | {s.median(s.profiled_wall):.2f} | "
                         f"{_ratio(s.ratio(s.profiled_wall, s.kernel))} | {dense_wall:.1f} | "
                         f"{dense.median(dense.kernel):.1f} | {dense_wall / wall:.1f}x | {macs} |")
            p = s.median_phases()
            if p:
                cells = [p.get(k, 0.0) for k in ("validate", "wait", "mask", "tiles", "feeds")]
                rest = s.paired([ph.get("execute", 0.0) for ph in s.phases], s.session)
                phase_lines.append(f"| {edit:.1%} | {variant} | " + " | ".join(f"{c:.2f}" for c in cells) +
                                   f" | {s.median(s.session):.2f} | {max(rest, 0.0):.2f} | {p.get('finish', 0.0):.2f} |")
    return "\n".join(lines + (phase_lines if len(phase_lines) > 5 else []))


def feed_cost(counts: list[int], runs: int) -> str:
    """Markdown table: one SPARSE-like call with N cache inputs fed by name vs bound once, on a graph
    whose compute is negligible (a Sum of N [1, 4, 4, 4] tensors), so the difference is the feeding."""
    from onnx import TensorProto, helper

    from sigec.runtime.backends import OrtRunner

    lines = ["| cache inputs | fed by name ms | bound ms | saved per run ms |", "|---|---|---|---|"]
    for n in counts:
        names = [f"cache::c{i}" for i in range(n)]
        value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 4, 4, 4])  # noqa: E731
        graph = helper.make_graph([helper.make_node("Sum", [*names, "x"], ["y"])], "feeds",
                                  [value(name) for name in [*names, "x"]], [value("y")])
        runner = OrtRunner(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), {}, threads=1,
                           weight_values={})
        rng = np.random.default_rng(0)
        caches = {name: rng.standard_normal((1, 4, 4, 4)).astype(np.float32) for name in names}
        x = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
        bindings = runner.bind_caches(caches)
        calls = {"fed": lambda: runner.run({**caches, "x": x}, ["y"]), "bound": lambda: bindings.run({"x": x}, ["y"])}
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(runs):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1e3)
        fed, bound = statistics.median(times["fed"]), statistics.median(times["bound"])
        lines.append(f"| {n} | {fed:.3f} | {bound:.3f} | {fed - bound:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["tiny_local", "resnet9"])
    parser.add_argument("--mode", default="approx", choices=["exact", "approx"])
    parser.add_argument("--edits", nargs="+", type=float, default=[0.0, 0.002, 0.012])
    parser.add_argument("--runs", type=int, default=7, help="measured runs per edit and variant (medians)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--variants", nargs="+", default=["bound", "unbound"], choices=VARIANTS)
    parser.add_argument("--feeds", nargs="*", type=int, default=[],
                        help="also time feeding N cache inputs by name vs bound, on a graph without compute")
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
        print("\n" + report(model, result, args.edits, args.variants), flush=True)
    if args.feeds:
        print(f"\n### Feeding the caches (1 thread, medians of {20 * args.runs} calls)\n\n"
              + feed_cost(args.feeds, 20 * args.runs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
