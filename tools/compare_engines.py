"""Several engines of one zoo model against dense ONNX Runtime, side by side in one process.

Usage: python tools/compare_engines.py --model ddpm_unet NAME=ENGINE [NAME=ENGINE ...]
       [--edits 0.012,0.05,0.1,0.2,1.0] [--repeats 3] [--threads 2]

Every engine is primed with the model's example inputs; for each edit size (a centred square with
noise added) the script alternates one dense run (the first engine's DENSE graph) and one run of
every engine, ``--repeats`` times after a warm-up, and prints a markdown table of medians:
speedup, MAC reduction and efficiency of the run, relative L2 error against dense, path taken.
Used for the "Dense resolutions and autotuning" comparison in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import sigec
from sigec.runtime.synthetic_edits import edit_inputs, square_mask
from sigec.apps.zoo import build


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs="+", metavar="NAME=ENGINE")
    parser.add_argument("--model", default="ddpm_unet")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--edits", default="0.012,0.05,0.1,0.2,1.0")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    named = dict(item.split("=", 1) for item in args.engines)
    _, example = build(args.model, small=args.small)
    original = {k: v.numpy() for k, v in example.items()}
    engines = {name: sigec.load(path, threads=args.threads) for name, path in named.items()}
    first = next(iter(engines.values()))
    spatial = [i["name"] for i in first.manifest["inputs"] if i["spatial"]]
    height, width = first.manifest["mask_program"]["input_size"]
    for engine in engines.values():
        engine.prime(original)
    print("| edit | dense ORT ms | " + " | ".join(f"{n} ms | {n} speedup | {n} MAC red. | {n} eff. | {n} rel. L2"
                                             for n in engines) + " |")
    print("|---|---|" + "---|---|---|---|---|" * len(engines))
    for edit in (float(e) for e in args.edits.split(",")):
        mask = square_mask(height, width, edit)
        edited = edit_inputs(original, spatial, mask)
        reference = first.run_dense(edited)[0]
        stats, errors = {}, {}
        for name, engine in engines.items():
            out = engine.run(edited, mask=mask)[0]
            stats[name] = engine.stats
            errors[name] = float(np.linalg.norm(out - reference) / (np.linalg.norm(reference) + 1e-12))
        times: dict[str, list[float]] = {name: [] for name in ["dense", *engines]}
        for _ in range(args.repeats):
            times["dense"].append(_ms(lambda: first.run_dense(edited)))
            for name, engine in engines.items():
                times[name].append(_ms(lambda: engine.run(edited, mask=mask)))
        med = {name: statistics.median(t) for name, t in times.items()}
        cells = []
        for name in engines:
            speedup = med["dense"] / med[name]
            reduction = stats[name].mac_reduction
            cells.append(f"{med[name]:.0f} | {speedup:.2f}x | {reduction:.2f}x | {speedup / reduction:.2f} | "
                         f"{errors[name]:.2e}")
        print(f"| {edit:.1%} | {med['dense']:.0f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
