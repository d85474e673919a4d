"""Benchmark sigec on zoo generators: sparse vs dense ONNX Runtime, side by side in one process.

Usage: python tools/bench.py [--model ddpm_unet] [--edits 0.012,0.05,0.1,0.2,0.5,1.0] [--repeats 3]
       [--threads 2] [--mode approx] [--write BENCHMARKS.md]

For each edit size (a centred square of that fraction of the image, noise added inside it) the
script primes the engine with the original inputs, then alternates dense ORT and sigec sparse runs
(after one warm-up each) and reports medians, the MAC reduction the mask program gives, the
efficiency (speedup / MAC reduction) and the relative L2 error of sparse against dense. Dense
PyTorch is timed once per model for reference.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

import sigec
from sigec.bench import markdown_table, measure
from sigec.zoo import build


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.machine()} {cpu}, {os.cpu_count()} cores"


def _torch_dense_ms(module: torch.nn.Module, inputs: dict[str, torch.Tensor], threads: int, repeats: int) -> float:
    torch.set_num_threads(threads)
    times = []
    with torch.inference_mode():
        module(**inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            module(**inputs)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def run(model_name: str, edits: list[float], repeats: int, threads: int, mode: str, small: bool,
        tile_size: int | None) -> str:
    """Benchmark one zoo model; return the markdown section."""
    module, example = build(model_name, small=small)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / f"{model_name}.sigec"
        start = time.perf_counter()
        sigec.compile(module, path, inputs=example, mode=mode, tile_size=tile_size, progress=True)
        compile_s = time.perf_counter() - start
        engine = sigec.load(path, threads=threads)
        original = {k: v.numpy() for k, v in example.items()}
        rows = measure(engine, original, edits, repeats=repeats)
        cache_mb = engine.cache_bytes() / 2**20
    torch_ms = _torch_dense_ms(module, example, threads, repeats)
    cmd = "python tools/bench.py --model {} --mode {} --repeats {} --threads {}{}".format(
        model_name, mode, repeats, threads, " --small" if small else "")
    shape = "x".join(str(s) for s in next(iter(example.values())).shape)
    return "\n".join([
        f"### {model_name} ({shape}, mode {mode}, {threads} threads)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today()}; machine: {_machine()}; onnxruntime {__import__('onnxruntime').__version__}, "
        f"torch {torch.__version__}.  ",
        f"Compile time {compile_s:.1f} s; caches {cache_mb:.1f} MiB per key; dense PyTorch {torch_ms:.1f} ms.",
        "",
        markdown_table(rows),
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ddpm_unet")
    parser.add_argument("--edits", default="0.012,0.05,0.1,0.2,0.5,1.0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--mode", default="approx", choices=["approx", "exact"])
    parser.add_argument("--tile-size", type=int, default=None)
    parser.add_argument("--small", action="store_true", help="use the test-size model (quick check)")
    parser.add_argument("--write", help="append the section to this markdown file")
    args = parser.parse_args()
    section = run(args.model, [float(e) for e in args.edits.split(",")], args.repeats, args.threads, args.mode,
                  args.small, args.tile_size)
    print(section)
    if args.write:
        with open(args.write, "a") as f:
            f.write(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
