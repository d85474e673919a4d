"""Peak memory of the sparse engine (caches included) against a dense ONNX Runtime run.

Usage: python tools/peak_memory.py ENGINE_OR_MODEL [...] [--small] [--edit 0.012] [--threads 2]
       [--dense-onnx FILE] [--json PATH]

ENGINE_OR_MODEL is an engine file, or a zoo model name (compiled first, mode approx; ``--small``
for the test-size model). Each measurement runs in a fresh Python process, so peaks do not mix:

- *dense ORT*: an ONNX Runtime session of the engine's DENSE graph (its weights attached the way
  ``sigec.load`` attaches them: memory-mapped from the engine file, external initializers),
  running once;
- *dense ONNX file* (with ``--dense-onnx``): the same for a self-contained ONNX file, e.g. the
  fastest dense baseline from ``tools/dense_baseline.py --save-fastest``;
- *sigec*: ``sigec.load`` (FULL, SPARSE and DENSE sessions), ``prime`` of one key, one sparse
  run at a centred square edit of ``--edit`` of the image.

With ``--primes N`` it measures instead what priming costs beyond the caches, per ONNX Runtime
memory configuration (``--configs``, each in a fresh process): ``sigec.load``, ``prime`` of N keys
(distinct random inputs), the RSS after each, then ``--runs`` sparse runs at ``--edit`` and 3
dense runs; it reports the RSS growth per prime against the caches one key holds, the FULL (prime)
time and the median sparse and dense times. Configurations (runtime/backends.py, ``make_runners``'
``arenas``): ``default`` (``ARENAS``), ``arena`` (the CPU memory arena in every session), ``full_no_arena`` (none in FULL),
``full_shrink`` (FULL keeps its arena but shrinks it after every run: run option
``memory.enable_memory_arena_shrinkage``), ``no_arena`` (none anywhere).

Each child reports its peak RSS (VmHWM from /proc/self/status), the RSS after its imports (the
same modules in every child: onnxruntime, onnx, sigec and its runtime), the RSS after loading and,
for sigec, after priming, and ``engine.cache_bytes()``. The table gives the peak and the peak's increase over the RSS after
imports (what the model itself costs). Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

KINDS = ("dense", "onnx", "sparse", "primes", "speed")
CONFIGS = {"default": {}, "arena": {"full": True, "sparse": True, "dense": True},
           "full_no_arena": {"full": False, "sparse": True, "dense": True},
           "full_shrink": {"full": True, "sparse": True, "dense": True},
           "full_copy": {"full": True, "sparse": True, "dense": True},
           "no_arena": {"full": False, "sparse": False, "dense": False}}
SHRINK = ("full_shrink",)
COPY = ("full_copy",)  # FULL's outputs copied out of its arena (numpy-owned caches)


def _runners(contents: Any, config: str, threads: int) -> dict[str, Any]:
    """The engine's runners in the memory ``config``."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from sigec.runtime.backends import make_runners

    graphs = {n: onnx.ModelProto.FromString(contents.graphs[n]) for n in ("full", "sparse", "dense")}
    runners = make_runners("ort", graphs, contents.weights, threads=threads, arenas=CONFIGS[config])
    full = runners["full"]
    if config in SHRINK:
        full.run_options = ort.RunOptions()
        full.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    if config in COPY:
        run = full.run
        full.run = lambda feeds, names: [np.array(a, copy=True) for a in run(feeds, names)]
    return runners


def primes_child(engine: str, *, config: str, primes: int, runs: int, edit: float, threads: int) -> dict[str, Any]:
    """Load ``engine`` with the memory ``config``, prime ``primes`` keys, time sparse and dense runs."""
    import statistics
    import time

    import onnxruntime  # noqa: F401  (imported before the baseline RSS)

    from sigec.core.engine_file import read_engine
    from sigec.runtime.engine import Engine
    from sigec.runtime.synthetic_edits import edit_inputs, random_inputs, square_mask

    result: dict[str, Any] = {"kind": "primes", "config": config, "rss_after_imports": _rss()}
    contents = read_engine(engine)
    loaded = Engine(contents.manifest, _runners(contents, config, threads), path=engine)
    loaded.dense_fallback_fraction = float("inf")
    manifest = contents.manifest
    result["rss_after_load"] = _rss()
    rss, prime_s = [result["rss_after_load"]], []
    for key in range(primes):
        inputs = random_inputs(manifest, seed=key)
        start = time.perf_counter()
        loaded.prime(inputs, key=key)
        prime_s.append(time.perf_counter() - start)
        rss.append(_rss())
    result.update(rss_after_primes=rss, prime_s=prime_s, cache_bytes=loaded.cache_bytes(),
                  key_bytes=loaded.cache_bytes(0))
    h, w = manifest["mask_program"]["input_size"]
    mask = square_mask(h, w, edit)
    spatial = [i["name"] for i in manifest["inputs"] if i["spatial"]]
    original = random_inputs(manifest, seed=0)
    edited = edit_inputs(original, spatial, mask)
    sparse_s = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        loaded.run(edited, mask=mask, key=0)
        sparse_s.append(time.perf_counter() - start)
    dense_s = []
    for _ in range(4):
        start = time.perf_counter()
        loaded.run_dense(edited)
        dense_s.append(time.perf_counter() - start)
    result.update(sparse_ms=1e3 * statistics.median(sparse_s[1:]), dense_ms=1e3 * statistics.median(dense_s[1:]),
                  path=loaded.stats.path, edit=edit, rss_end=_rss(), peak=_peak())
    return result


def speed_child(engine: str, *, configs: Sequence[str] = ("arena", "no_arena"), pairs: int, sparse_pairs: int,
                edit: float, threads: int) -> dict[str, Any]:
    """FULL (prime), SPARSE and DENSE times of two engines in one process in the memory ``configs``
    (A, B), alternating ABBA so drifts of the machine hit both alike."""
    import statistics
    import time

    from sigec.core.engine_file import read_engine
    from sigec.runtime.engine import Engine
    from sigec.runtime.synthetic_edits import edit_inputs, random_inputs, square_mask

    contents = read_engine(engine)
    a, b = configs
    engines = {}
    for config in configs:
        engines[config] = Engine(contents.manifest, _runners(contents, config, threads), path=engine)
        engines[config].dense_fallback_fraction = float("inf")
    manifest = contents.manifest
    original = random_inputs(manifest, seed=0)
    h, w = manifest["mask_program"]["input_size"]
    mask = square_mask(h, w, edit)
    edited = edit_inputs(original, [i["name"] for i in manifest["inputs"] if i["spatial"]], mask)
    calls = {"full": lambda e: e.prime(original), "sparse": lambda e: e.run(edited, mask=mask),
             "dense": lambda e: e.run_dense(edited)}
    times: dict[str, dict[str, list[float]]] = {g: {c: [] for c in engines} for g in calls}
    for config, e in engines.items():  # warm-up: first runs allocate
        for call in calls.values():
            call(e)
    for graph, call in calls.items():
        n = sparse_pairs if graph == "sparse" else pairs
        for i in range(n):
            order = (a, b) if i % 2 == 0 else (b, a)
            for config in order:
                start = time.perf_counter()
                call(engines[config])
                times[graph][config].append(time.perf_counter() - start)
    result: dict[str, Any] = {"kind": "speed", "configs": [a, b], "edit": edit, "threads": threads, "times": times}
    for graph, by_config in times.items():
        ratios = [tb / ta for ta, tb in zip(by_config[a], by_config[b])]
        result[graph] = {c: 1e3 * statistics.median(v) for c, v in by_config.items()}
        result[graph]["ratio"] = statistics.median(ratios)
    return result


def speed_markdown(result: Mapping[str, Any]) -> str:
    """The speed figures as a markdown table."""
    a, b = result["configs"]
    lines = [f"| graph | {a} ms (median) | {b} ms (median) | {b} / {a} (median of adjacent pairs) |",
             "|---|---|---|---|"]
    labels = {"full": "FULL (prime)", "sparse": f"SPARSE ({result['edit']:.1%} edit)", "dense": "DENSE"}
    for graph, label in labels.items():
        r = result[graph]
        lines.append(f"| {label} | {r[a]:.1f} | {r[b]:.1f} | {r['ratio']:.3f} |")
    return "\n".join(lines)


def primes_markdown(results: Sequence[Mapping[str, Any]], threads: int) -> str:
    """The primes figures as a markdown table: the RSS growth of each prime, and the excess of the
    N primes' total growth over N keys' caches (what the process holds beyond them)."""
    import statistics

    lines = ["| configuration | caches MiB/key | RSS growth of each prime MiB | excess over N keys' caches MiB | "
             "prime s: first, median of the others | "
             f"sparse ms ({threads} threads, median) | dense ms (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        rss = r["rss_after_primes"]
        steps = ", ".join(f"{(b - a) / 2**20:.0f}" for a, b in zip(rss, rss[1:]))
        excess = rss[-1] - rss[0] - (len(rss) - 1) * r["key_bytes"]
        times = r["prime_s"]
        lines.append(f"| {r['config']} | {_mib(r['key_bytes'])} | {steps} | {_mib(excess)} | "
                     f"{times[0]:.2f}, {statistics.median(times[1:] or times):.2f} | {r['sparse_ms']:.1f} | "
                     f"{r['dense_ms']:.1f} |")
    return "\n".join(lines)


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field (peak memory needs Linux)")


def _rss() -> int:
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    return _status_kib("VmHWM") * 1024


def child(kind: str, engine: str, *, edit: float, threads: int, dense_onnx: str | None = None) -> dict[str, Any]:
    """Run one measurement in this (fresh) process and return its figures in bytes."""
    import onnx
    import onnxruntime  # noqa: F401  (everything used below is imported before the baseline RSS)

    import sigec
    import sigec.runtime.ort_ops  # noqa: F401
    from sigec.apps.bench import onnx_dense_run
    from sigec.runtime.synthetic_edits import edit_inputs, random_inputs, square_mask
    from sigec.core.engine_file import read_engine, read_manifest
    from sigec.runtime.backends import OrtRunner

    manifest = read_manifest(engine)
    inputs = random_inputs(manifest)
    result: dict[str, Any] = {"kind": kind, "rss_after_imports": _rss()}
    if kind == "dense":
        contents = read_engine(engine)
        graph = onnx.ModelProto.FromString(contents.graphs["dense"])
        runner = OrtRunner(graph, contents.weights, threads=threads, weight_values={})
        result["rss_after_load"] = _rss()
        runner.run(inputs, [o.name for o in graph.graph.output])
    elif kind == "onnx":
        if dense_onnx is None:
            raise ValueError("the 'onnx' measurement needs dense_onnx")
        run = onnx_dense_run(dense_onnx, threads, [i["name"] for i in manifest["inputs"]])
        result["rss_after_load"] = _rss()
        run(inputs)
    elif kind == "sparse":
        loaded = sigec.load(engine, threads=threads)
        result["rss_after_load"] = _rss()
        loaded.prime(inputs)
        result["rss_after_prime"] = _rss()
        h, w = manifest["mask_program"]["input_size"]
        mask = square_mask(h, w, edit)
        spatial = [i["name"] for i in manifest["inputs"] if i["spatial"]]
        loaded.run(edit_inputs(inputs, spatial, mask), mask=mask)
        result["cache_bytes"] = loaded.cache_bytes()
        result["path"] = loaded.stats.path
        result["edit"] = edit
    else:
        raise ValueError(f"unknown measurement {kind!r}; expected one of {KINDS}")
    result["rss_end"] = _rss()
    result["peak"] = _peak()
    result["peak_increase"] = result["peak"] - result["rss_after_imports"]
    return result


def _run_child(kind: str, engine: str, edit: float, threads: int, dense_onnx: str | None = None) -> dict[str, Any]:
    """Run ``child`` in a fresh interpreter and parse its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, engine, "--edit", str(edit),
           "--threads", str(threads)] + (["--dense-onnx", dense_onnx] if dense_onnx else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"peak-memory child '{kind}' on {engine} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_primes_child(engine: str, config: str, args: argparse.Namespace) -> dict[str, Any]:
    """``primes_child`` in a fresh interpreter."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "primes", engine, "--config", config,
           "--primes", str(args.primes), "--runs", str(args.runs), "--edit", str(args.edit),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"primes child '{config}' on {engine} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_peak(engine: str | os.PathLike, *, edit: float = 0.012, threads: int = 2,
                 dense_onnx: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """Peak-memory figures of the dense run(s) and of sigec for ``engine``, each from a fresh process."""
    engine = os.fspath(engine)
    results = {"dense": _run_child("dense", engine, edit, threads)}
    if dense_onnx is not None:
        results["onnx"] = _run_child("onnx", engine, edit, threads, os.fspath(dense_onnx))
    results["sparse"] = _run_child("sparse", engine, edit, threads)
    return results


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def markdown(results: Mapping[str, Mapping[str, Any]]) -> str:
    """The figures as a markdown table and one summary line."""
    labels = {"dense": "dense ORT (engine's DENSE graph, one run)",
              "onnx": "dense ORT (ONNX file, one run)",
              "sparse": "sigec (load, prime 1 key, 1 sparse run at {edit:.1%})"}
    lines = ["| process | peak RSS MiB | peak - RSS after imports MiB | after load MiB | caches MiB |",
             "|---|---|---|---|---|"]
    for kind in KINDS:
        if kind not in results:
            continue
        r = results[kind]
        load = r["rss_after_load"] - r["rss_after_imports"]
        lines.append(f"| {labels[kind].format(edit=r.get('edit', 0.0))} | {_mib(r['peak'])} | "
                     f"{_mib(r['peak_increase'])} | {_mib(load)} | {_mib(r.get('cache_bytes'))} |")
    dense, sparse = results["dense"], results["sparse"]
    lines += ["", f"sigec's peak increase is {sparse['peak_increase'] / max(dense['peak_increase'], 1):.2f}x the dense "
                  f"run's; engine caches {_mib(sparse['cache_bytes'])} MiB per key (path of the run: {sparse['path']}). "
                  "'after load' is the RSS increase from loading the weights and creating the session(s); "
                  "each row is a fresh process."]
    return "\n".join(lines)


def _engine_for(target: str, small: bool, workdir: pathlib.Path) -> str:
    """An engine path: ``target`` itself, or the zoo model ``target`` compiled into ``workdir``."""
    if os.path.exists(target):
        return target
    import sigec
    from sigec.apps.zoo import MODELS, build

    if target not in MODELS:
        raise SystemExit(f"peak_memory: {target!r} is neither a file nor a zoo model ({', '.join(sorted(MODELS))})")
    module, example = build(target, small=small)
    path = workdir / f"{target}.sigec"
    sigec.compile(module, path, inputs=example, progress=True)
    return os.fspath(path)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Measure every target; print a markdown section per target and return the figures by target."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="+", metavar="ENGINE_OR_MODEL")
    parser.add_argument("--small", action="store_true", help="zoo models: the test-size model")
    parser.add_argument("--edit", type=float, default=0.012, help="edited fraction of the image (default 0.012)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dense-onnx", default=None, help="also measure this self-contained dense ONNX file")
    parser.add_argument("--json", type=pathlib.Path, default=None)
    parser.add_argument("--primes", type=int, default=0, help="measure N primes per memory configuration instead")
    parser.add_argument("--configs", default="arena,full_no_arena,full_shrink,no_arena", help="memory configurations of --primes")
    parser.add_argument("--runs", type=int, default=10, help="--primes: timed sparse runs")
    parser.add_argument("--speed", type=int, default=0, metavar="PAIRS",
                        help="time FULL and DENSE runs (PAIRS pairs; SPARSE: 5x) with and without the arena instead")
    parser.add_argument("--speed-configs", default="arena,no_arena", help="--speed: the two memory configurations")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "primes":
        print(json.dumps(primes_child(args.targets[0], config=args.config, primes=args.primes, runs=args.runs,
                                      edit=args.edit, threads=args.threads)))
        return {}
    if args.speed:
        everything = {}
        for target in args.targets:
            result = speed_child(target, configs=args.speed_configs.split(","), pairs=args.speed, sparse_pairs=5 * args.speed, edit=args.edit,
                                 threads=args.threads)
            everything[target] = result
            print(f"### Arena speed: {target}, {args.threads} threads\n\n{speed_markdown(result)}\n")
        if args.json is not None:
            args.json.write_text(json.dumps(everything, indent=2) + "\n")
        return everything
    if args.child:
        print(json.dumps(child(args.child, args.targets[0], edit=args.edit, threads=args.threads,
                               dense_onnx=args.dense_onnx)))
        return {}
    everything = {}
    with tempfile.TemporaryDirectory(prefix="sigec-peak-") as tmp:
        for target in args.targets:
            engine = _engine_for(target, args.small, pathlib.Path(tmp))
            if args.primes:
                rows = [_run_primes_child(engine, c, args) for c in args.configs.split(",") if c]
                everything[target] = {r["config"]: r for r in rows}
                print(f"### Primes: {target}{' (small)' if args.small and engine != target else ''}, "
                      f"{args.primes} keys, {args.threads} threads\n")
                print(primes_markdown(rows, args.threads) + "\n")
                continue
            results = measure_peak(engine, edit=args.edit, threads=args.threads, dense_onnx=args.dense_onnx)
            everything[target] = results
            print(f"### Peak memory: {target}{' (small)' if args.small and engine != target else ''}, "
                  f"{args.threads} threads\n")
            print(markdown(results) + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps(everything, indent=2) + "\n")
    return everything


if __name__ == "__main__":
    main()
