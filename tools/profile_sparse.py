"""Where the time of a sparse run goes: ONNX Runtime's profiler, aggregated per op type.

Usage: python tools/profile_sparse.py ENGINE [--edit 0.012] [--runs 3] [--threads 2]
Prints a markdown table (op type, total ms per run, share, node count) for the SPARSE graph, and the
same for the DENSE graph for comparison.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile

import numpy as np
import onnx

from sigec.bench import edit_inputs, square_mask
from sigec.engine_file import read_engine
from sigec.runtime.backends import make_runners
from sigec.runtime.engine import Engine


def aggregate(profile_path: str, runs: int) -> list[tuple[str, float, int]]:
    """(op type, ms per run, node count) sorted by time, from an ORT profile JSON."""
    events = json.load(open(profile_path))
    total: dict[str, float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"].get("op_name", "?")
            total[op] += e["dur"] / 1e3
            nodes[op].add(e["name"])
    return sorted(((op, t / runs, len(nodes[op])) for op, t in total.items()), key=lambda r: -r[1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("engine")
    parser.add_argument("--edit", type=float, default=0.012)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    contents = read_engine(args.engine)
    graphs = {k: onnx.ModelProto.FromString(v) for k, v in contents.graphs.items()}
    tmp = tempfile.mkdtemp()
    runners = make_runners("ort", graphs, contents.weights, threads=args.threads,
                           profile={"sparse": os.path.join(tmp, "sparse"), "dense": os.path.join(tmp, "dense")})
    engine = Engine(contents.manifest, runners, dense_fallback_fraction=2.0)
    rng = np.random.default_rng(0)
    original = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in contents.manifest["inputs"]}
    h, w = contents.manifest["mask_program"]["input_size"]
    mask = square_mask(h, w, args.edit)
    spatial = [i["name"] for i in contents.manifest["inputs"] if i["spatial"]]
    edited = edit_inputs(original, spatial, mask)
    engine.prime(original)
    walls = []
    for _ in range(args.runs):
        engine.run(edited, mask=mask)
        walls.append(engine.stats.wall_ms)
        engine.run_dense(edited)
    for name in ("sparse", "dense"):
        path = runners[name].session.end_profiling()
        rows = aggregate(path, args.runs)
        total = sum(r[1] for r in rows)
        print(f"\n{name} graph: {total:.1f} ms of kernel time per run" +
              (f" (wall {np.median(walls):.1f} ms, stats {engine.stats})" if name == "sparse" else ""))
        print("| op type | ms per run | share | nodes |\n|---|---|---|---|")
        for op, ms, count in rows[:15]:
            print(f"| {op} | {ms:.1f} | {ms / total * 100:.1f}% | {count} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
