"""Soak test (not in CI): many sparse runs on a small engine, watching memory and results.

Usage: python tools/soak.py [--runs 5000] [--model tiny_local|random] [--check-every 250]
       [--update-every 50] [--warmup 500] [--max-growth 0.05] [--threads 1] [--seed 0]

The engine (exact mode) is compiled into a temporary folder from the zoo's ``tiny_local`` (64 px,
8 channels: small enough for thousands of runs a minute, large enough that the random edits stay
on the sparse path) or from a random local net (tests/random_nets.py, 20 px), primed once,
then run ``--runs`` times with random rectangular edits (half of them given as an explicit mask,
half found from the difference to the original). Every ``--update-every``-th run uses
``update_cache=True`` (the edit becomes the new original). Every ``--check-every`` runs the sparse
result is compared with ``run_dense`` (relative error <= 1e-4 of the output's magnitude) and the
resident memory (VmRSS from /proc/self/status) is sampled.

Exit status: 0 when the results agree and the RSS at the end is within ``--max-growth`` (5 %) of
the RSS after the warm-up; 1 when the memory grew beyond that; 2 when results diverged.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import pathlib
import platform
import sys
import tempfile
import time
from collections import Counter

import numpy as np

import sigec

TOLERANCE = 1e-4  # relative to the dense output's largest magnitude


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS), in bytes."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def build_engine(model: str, folder: pathlib.Path, threads: int) -> tuple[sigec.Engine, dict[str, np.ndarray]]:
    """Compile and load the soak engine; return it with its original inputs."""
    if model == "tiny_local":
        from sigec.apps.zoo import build

        module, example = build("tiny_local", small=True, size=64)
        path = sigec.compile(module, folder / "tiny_local.sigec", inputs=example, mode="exact")
        inputs = {k: v.numpy() for k, v in example.items()}
    elif model == "random":
        sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))
        from random_nets import random_local_net

        path = sigec.compile(random_local_net(7, depth=6, size=(20, 20)), folder / "random.sigec", mode="exact")
        inputs = {"x": np.random.default_rng(0).standard_normal((1, 3, 20, 20)).astype(np.float32)}
    else:
        raise SystemExit(f"unknown model {model!r}: choose tiny_local or random")
    return sigec.load(path, threads=threads), inputs


def random_edit(rng: np.random.Generator, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An edited copy of ``original`` (1 or 2 small rectangles of noise) and its pixel mask [H, W]."""
    _, _, h, w = original.shape
    mask = np.zeros((h, w), bool)
    for _ in range(1 if rng.random() < 0.75 else 2):
        y, x = rng.integers(0, h), rng.integers(0, w)
        mask[y:y + int(rng.integers(1, max(h // 8, 2))), x:x + int(rng.integers(1, max(w // 8, 2)))] = True
    noise = rng.standard_normal(original.shape).astype(original.dtype) * 0.5
    return original + mask * noise, mask


def soak(engine: sigec.Engine, inputs: dict[str, np.ndarray], *, runs: int, check_every: int, update_every: int,
         warmup: int, seed: int) -> dict[str, object]:
    """Run the soak loop; return its measurements."""
    spatial = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
    if len(spatial) != 1:
        raise SystemExit("the soak test expects an engine with one spatial input")
    name = spatial[0]
    rng = np.random.default_rng(seed)
    engine.prime(inputs)
    current = dict(inputs)
    gc.collect()
    rss_start = rss_bytes()
    rss_warm = None
    samples: list[tuple[int, int]] = []
    paths: Counter[str] = Counter()
    worst, checks, failures = 0.0, 0, []
    start = time.perf_counter()
    for i in range(1, runs + 1):
        edited, mask = random_edit(rng, current[name])
        feeds = {**current, name: edited}
        update = update_every > 0 and i % update_every == 0
        outputs = engine.run(feeds, mask=mask if i % 2 else None, update_cache=update)
        paths[engine.stats.path] += 1
        if update:
            current = feeds
        if i % check_every == 0 or i == runs:
            dense = engine.run_dense(feeds)
            err = max(float(np.abs(s - d).max() / (np.abs(d).max() + 1e-12)) for s, d in zip(outputs, dense))
            worst, checks = max(worst, err), checks + 1
            if not err <= TOLERANCE:
                failures.append((i, err))
            gc.collect()
            samples.append((i, rss_bytes()))
        if i == warmup:
            gc.collect()
            rss_warm = rss_bytes()
    elapsed = time.perf_counter() - start
    gc.collect()
    rss_end = rss_bytes()
    rss_warm = rss_warm if rss_warm is not None else rss_start
    return {"runs": runs, "seconds": elapsed, "paths": dict(paths), "rss_start": rss_start, "rss_warm": rss_warm,
            "rss_end": rss_end, "rss_max": max([rss_end, *(r for _, r in samples)]), "growth": rss_end / rss_warm - 1,
            "checks": checks, "worst_rel_err": worst, "failures": failures, "samples": samples,
            "cache_bytes": engine.cache_bytes()}


def report(result: dict[str, object], args: argparse.Namespace) -> str:
    """Human-readable summary."""
    mib = 2 ** 20
    lines = [
        f"sigec soak: {args.model}, {result['runs']} runs, {args.threads} intra-op thread(s), "
        f"update_cache every {args.update_every} runs, seed {args.seed}",
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}, python {platform.python_version()}, "
        f"sigec {sigec.__version__}",
        f"time {result['seconds']:.1f} s ({1e3 * result['seconds'] / result['runs']:.2f} ms/run), "
        f"paths {result['paths']}",
        f"RSS start {result['rss_start'] / mib:.1f} MiB, after warm-up ({args.warmup} runs) "
        f"{result['rss_warm'] / mib:.1f} MiB, end {result['rss_end'] / mib:.1f} MiB, max {result['rss_max'] / mib:.1f} MiB, "
        f"growth after warm-up {100 * result['growth']:+.2f} % (limit {100 * args.max_growth:.0f} %)",
        f"cache bytes held at the end {result['cache_bytes']}",
        f"dense checks {result['checks']}, worst relative error {result['worst_rel_err']:.2e} "
        f"(limit {TOLERANCE:.0e}), failures {len(result['failures'])}",
    ]
    if result["failures"]:
        lines.append(f"first diverging runs: {result['failures'][:5]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--model", default="tiny_local", choices=["tiny_local", "random"])
    parser.add_argument("--check-every", type=int, default=250)
    parser.add_argument("--update-every", type=int, default=50, help="0: never update the cache")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--max-growth", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.check_every < 1 or args.warmup < 0:
        parser.error("--runs and --check-every must be positive, --warmup non-negative")
    with tempfile.TemporaryDirectory(prefix="sigec-soak-") as folder:
        engine, inputs = build_engine(args.model, pathlib.Path(folder), args.threads)
        result = soak(engine, inputs, runs=args.runs, check_every=args.check_every, update_every=args.update_every,
                      warmup=min(args.warmup, args.runs), seed=args.seed)
    print(report(result, args))
    if result["failures"]:
        print("FAIL: sparse results diverged from dense")
        return 2
    if result["growth"] > args.max_growth:
        print("FAIL: resident memory grew after the warm-up")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
