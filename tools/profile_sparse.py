"""Where the time of a sparse run goes: ONNX Runtime's profiler, per op type and per resolution.

Usage: python tools/profile_sparse.py ENGINE [--edit 0.012] [--runs 3] [--threads 2]

Prints markdown tables: kernel time per op type for the SPARSE and the DENSE graph, and per
resolution: active fraction, sparse and dense kernel time, and the *area efficiency*
(dense ms x active fraction / sparse ms: 1.0 means the resolution's sparse work costs exactly its
share of the dense work; below 1, gathers, halos and small-tile convolutions cost extra).
Attribution rules: ``sigec.runtime.profiling``.
"""

from __future__ import annotations

import argparse
import sys

from sigec.core.errors import SigecError
from sigec.runtime.profiling import OTHER, EngineProfile, GraphProfile, profile_engine


def op_table(profile: GraphProfile, top: int = 15) -> str:
    """Kernel time per op type."""
    total = profile.total_ms
    lines = ["| op type | ms per run | share | nodes |", "|---|---|---|---|"]
    for op, ms in list(profile.by_op.items())[:top]:
        lines.append(f"| {op} | {ms:.1f} | {ms / total * 100:.1f}% | {profile.nodes_by_op.get(op, 0)} |")
    return "\n".join(lines)


def _pixels(resolution: str) -> int:
    """Pixels of a resolution name ``rHxW`` (-1 for "other", listed last)."""
    if resolution == OTHER:
        return -1
    height, width = resolution[1:].split("x")
    return int(height) * int(width)


def resolution_table(result: EngineProfile) -> str:
    """Sparse vs dense kernel time per resolution, largest resolution first."""
    names = set(result.sparse.by_resolution) | set(result.dense.by_resolution)
    lines = ["| resolution | active fraction | sparse ms | of which gathers + reorders | dense ms | area efficiency |",
             "|---|---|---|---|---|---|"]
    for name in sorted(names, key=_pixels, reverse=True):
        sparse = result.sparse.by_resolution.get(name, 0.0)
        dense = result.dense.by_resolution.get(name, 0.0)
        moves = sum(result.sparse.by_resolution_op.get((name, op), 0.0)
                    for op in ("TileGather", "TileScatter", "ReorderInput", "ReorderOutput"))
        fraction = result.active_fraction.get(name)
        if fraction is None:
            fraction_text, efficiency = ("dense" if sparse and name != OTHER else "-"), "-"
        else:
            fraction_text = f"{fraction:.3f}"
            efficiency = f"{dense * fraction / sparse:.2f}" if sparse else "-"
        lines.append(f"| {name} | {fraction_text} | {sparse:.1f} | {moves:.1f} | {dense:.1f} | {efficiency} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Profile the engine named on the command line and print the tables; 2 on a sigec error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("engine", help="engine file (.sigec)")
    parser.add_argument("--edit", type=float, default=0.012, help="edited fraction of the image (a centred square)")
    parser.add_argument("--runs", type=int, default=3, help="profiled sparse and dense runs")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    args = parser.parse_args(argv)
    if not 0.0 < args.edit <= 1.0 or args.runs < 1:
        parser.error("--edit must lie in (0, 1] and --runs be at least 1")
    try:
        result = profile_engine(args.engine, edit=args.edit, runs=args.runs, threads=args.threads)
    except SigecError as exc:
        print(f"profile_sparse: error: {exc}", file=sys.stderr)
        return 2
    print(f"edit {args.edit:.1%}: MAC reduction {result.mac_reduction:.2f}x; sparse wall {result.sparse_wall_ms:.1f} ms; "
          f"kernel time sparse {result.sparse.total_ms:.1f} ms, dense {result.dense.total_ms:.1f} ms "
          f"(ratio {result.dense.total_ms / result.sparse.total_ms:.2f}x)")
    print("\nsparse graph\n" + op_table(result.sparse))
    print("\ndense graph\n" + op_table(result.dense))
    print("\nper resolution\n" + resolution_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
