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

KINDS = ("dense", "onnx", "sparse")


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
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.targets[0], edit=args.edit, threads=args.threads,
                               dense_onnx=args.dense_onnx)))
        return {}
    everything = {}
    with tempfile.TemporaryDirectory(prefix="sigec-peak-") as tmp:
        for target in args.targets:
            engine = _engine_for(target, args.small, pathlib.Path(tmp))
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
