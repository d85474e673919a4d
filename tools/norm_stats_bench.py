"""Normalisation statistics (``norm_stats``): frozen vs updated GroupNorm / InstanceNorm statistics in approx
mode, error against dense and sparse run time, side by side in one process.

Usage: python tools/norm_stats_bench.py [--model ddpm_unet] [--small] [--size S] [--edits 0.012,0.05,0.2]
       [--repeats 7] [--dense-repeats 3] [--threads 2] [--cache-dtype D] [--write BENCHMARKS.md]
       python tools/norm_stats_bench.py --updated-first 0,1,3,1000 [--model ...] [--edits ...]

Compiles the zoo model twice in approx mode (default tile size), with ``norm_stats="frozen"`` and
``"updated"``, primes both on the same inputs and, for each edit (a centred square with noise added inside,
as tools/bench.py edits; label maps relabelled), reports:

- the relative L2 error of each engine's sparse output against the dense output of the edited input
  (the engine's DENSE graph), over the whole output and inside the edited square (resampled to the
  output's size);
- sparse wall time (the sparse path forced, also where the engine would fall back to dense), the two
  engines alternating run by run after one warm-up each (so that load on a shared machine hits both alike): medians and minima of ``--repeats`` runs, and their ratio; the dense
  run is timed ``--dense-repeats`` times (median) for scale.

Also: the normalisations each engine rewrote with updated statistics, and the SPARSE graphs' node counts.

``--updated-first K,...`` is an experiment, errors only: for each K, an engine whose first K
normalisations (in the rewrite's topological order) use updated statistics and the others frozen ones
(the rewrite's decision table patched in this process, as tools/bench_global_pool.py does with its
rules); K = 0 is all frozen.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import tempfile
import time
import zipfile

import numpy as np
import onnx

import sigec
from sigec.apps.bench import machine
from sigec.apps.zoo import build
from sigec.runtime.synthetic_edits import edit_inputs, square_mask

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers: error measures and the edited region at an output's size
sys.path.insert(0, str(ROOT / "tools"))  # bench: the label-map edit

SETTINGS = ("frozen", "updated")
UPDATED_NOTE = "normalisation with statistics updated from the active tiles"


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _sparse_nodes(path: pathlib.Path) -> int:
    with zipfile.ZipFile(path) as z:
        return len(onnx.load_from_string(z.read("graphs/sparse.onnx")).graph.node)


def run(model_name: str, edits: list[float], repeats: int, dense_repeats: int, threads: int, small: bool,
        size: str | None, cache_dtype: str | None = None) -> str:
    """Measure one zoo model; return the markdown section."""
    from bench import _label_edit
    from helpers import always_sparse, region_of, rel_l2, rel_l2_in

    module, example = build(model_name, small=small, **({"size": size} if size else {}))
    original = {k: v.numpy() for k, v in example.items()}
    engines, nodes, updated_norms = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in SETTINGS:
            path = sigec.compile(module, pathlib.Path(tmp) / f"{setting}.sigec", inputs=example, mode="approx",
                                 norm_stats=setting, cache_dtype=cache_dtype)
            engines[setting] = always_sparse(sigec.load(path, threads=threads))
            nodes[setting] = _sparse_nodes(path)
            updated_norms[setting] = sum(1 for a in engines[setting].manifest["approximations"]
                                         if "updated from the active tiles" in a["detail"])
    del module  # the engines hold what runs; a large model's module is memory the runs need
    frozen = engines["frozen"]
    norms = sum(1 for a in frozen.manifest["approximations"] if "frozen from the original" in a["detail"])
    spatial = [i["name"] for i in frozen.manifest["inputs"] if i["spatial"]]
    h, w = frozen.manifest["mask_program"]["input_size"]
    make_edit = _label_edit(original) if model_name.startswith("spade") else None
    for engine in engines.values():
        engine.prime(original)
    rows = []
    for edit in edits:
        mask = square_mask(h, w, edit)
        edited = make_edit(mask) if make_edit else edit_inputs(original, spatial, mask)
        dense_out = frozen.run_dense(edited)[0]
        dense_t = [_ms(lambda: frozen.run_dense(edited)) for _ in range(dense_repeats)]
        region = region_of(mask, dense_out.shape)
        outs, times = {}, {s: [] for s in SETTINGS}
        for s in SETTINGS:  # warm-up, and the output whose error is measured
            outs[s] = engines[s].run(edited, mask=mask)[0]
            assert engines[s].stats.path == "sparse", (s, engines[s].stats.path)
        for _ in range(repeats):
            for s in SETTINGS:
                times[s].append(_ms(lambda: engines[s].run(edited, mask=mask)))
        _, executed, _ = frozen.expected_macs(mask)
        row = {"edit": edit, "macs": frozen._dense_macs() / max(executed, 1), "dense": statistics.median(dense_t)}
        for s in SETTINGS:
            row[s] = (statistics.median(times[s]), min(times[s]), rel_l2(outs[s], dense_out),
                      rel_l2_in(outs[s], dense_out, region))
        rows.append(row)
        print(f"edit {edit:g}: " + ", ".join(f"{s} {row[s][0]:.1f} ms (min {row[s][1]:.1f}), rel. L2 {row[s][2]:.3e} "
                                             f"/ inside {row[s][3]:.3e}" for s in SETTINGS), file=sys.stderr)
    shape = "x".join(str(d) for d in next(iter(example.values())).shape)
    cmd = (f"python tools/norm_stats_bench.py --model {model_name}" + (f" --size {size}" if size else "")
           + (" --small" if small else "") + f" --edits {','.join(f'{e:g}' for e in edits)} --repeats {repeats}"
           + f" --dense-repeats {dense_repeats} --threads {threads}"
           + (f" --cache-dtype {cache_dtype}" if cache_dtype else ""))
    lines = [
        f"#### {model_name}{' (small)' if small else ''} ({shape}, approx mode, {threads} threads)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today()}; machine: {machine()}; onnxruntime {__import__('onnxruntime').__version__}.  ",
        f"Normalisations: {norms} (updated: {updated_norms['updated']}); SPARSE nodes: frozen {nodes['frozen']}, "
        f"updated {nodes['updated']}; cache dtype {frozen.manifest['options'].get('cache_dtype', 'float32')}.",
        "",
        "| edit | MAC reduction | dense ms | frozen ms (min) | updated ms (min) | updated / frozen (medians) "
        "| rel. L2 frozen | rel. L2 updated | inside the edit: frozen | updated |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        f, u = r["frozen"], r["updated"]
        lines.append(f"| {r['edit'] * 100:.1f}% | {r['macs']:.2f}x | {r['dense']:.1f} | {f[0]:.1f} ({f[1]:.1f}) "
                     f"| {u[0]:.1f} ({u[1]:.1f}) | {u[0] / f[0]:.3f} | {f[2]:.3e} | {u[2]:.3e} | {f[3]:.3e} "
                     f"| {u[3]:.3e} |")
    return "\n".join(lines + [""])


def updated_first(model_name: str, counts: list[int], edits: list[float], threads: int, small: bool,
                  size: str | None, cache_dtype: str | None = None) -> str:
    """The ``--updated-first`` experiment: relative L2 errors against dense per K; the markdown table."""
    from helpers import always_sparse, region_of, rel_l2, rel_l2_in

    from sigec.passes import build_sparse_graph as bsg
    from sigec.passes.norm_stats import rule_updated_norm
    from sigec.passes.sparse_rules import rule_frozen_norm

    state = {"limit": 0, "seen": 0}

    def freeze(w: bsg.NodeWalk, node) -> None:
        rule = rule_updated_norm if state["seen"] < state["limit"] else rule_frozen_norm
        state["seen"] += 1
        rule(w.ctx, w.norms[node])
        w.frozen.update(w.norms[node].nodes)

    module, example = build(model_name, small=small, **({"size": size} if size else {}))
    original = {k: v.numpy() for k, v in example.items()}
    saved = bsg.DECISIONS
    bsg.DECISIONS = tuple(bsg.Step(s.name, s.applies, freeze) if s.name == "frozen normalisation" else s
                          for s in saved)
    lines = ["| updated normalisations | " + " | ".join(f"{e * 100:.1f}%: rel. L2 / inside" for e in edits) + " |",
             "|---|" + "---|" * len(edits)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for k in counts:
                state.update(limit=k, seen=0)
                path = sigec.compile(module, pathlib.Path(tmp) / f"first{k}.sigec", inputs=example, mode="approx",
                                     norm_stats="updated", cache_dtype=cache_dtype)
                engine = always_sparse(sigec.load(path, threads=threads))
                engine.prime(original)
                spatial = [i["name"] for i in engine.manifest["inputs"] if i["spatial"]]
                h, w = engine.manifest["mask_program"]["input_size"]
                cells = []
                for edit in edits:
                    mask = square_mask(h, w, edit)
                    edited = edit_inputs(original, spatial, mask)
                    dense, out = engine.run_dense(edited)[0], engine.run(edited, mask=mask)[0]
                    cells.append(f"{rel_l2(out, dense):.3e} / {rel_l2_in(out, dense, region_of(mask, dense.shape)):.3e}")
                lines.append(f"| first {min(k, state['seen'])} of {state['seen']} | " + " | ".join(cells) + " |")
                print(lines[-1], file=sys.stderr)
                del engine
    finally:
        bsg.DECISIONS = saved
    cmd = (f"python tools/norm_stats_bench.py --model {model_name}" + (f" --size {size}" if size else "")
           + (" --small" if small else "") + f" --edits {','.join(f'{e:g}' for e in edits)}"
           + f" --updated-first {','.join(str(k) for k in counts)}" + (f" --cache-dtype {cache_dtype}" if cache_dtype else ""))
    return "\n".join([f"Command: `{cmd}`", "", *lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ddpm_unet")
    parser.add_argument("--small", action="store_true", help="the test-size model")
    parser.add_argument("--size", default=None, help="zoo size variant (sd_unet: small, medium, full)")
    parser.add_argument("--edits", default="0.012,0.05,0.2")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dense-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dtype", default=None, help="cache dtype of both engines (default: the compiler's)")
    parser.add_argument("--write", help="append the section to this markdown file")
    parser.add_argument("--updated-first", default=None, metavar="0,1,3,1000",
                        help="experiment: errors with updated statistics for only the first K normalisations")
    args = parser.parse_args(argv)
    if args.updated_first:
        print(updated_first(args.model, [int(k) for k in args.updated_first.split(",")],
                            [float(e) for e in args.edits.split(",")], args.threads, args.small, args.size,
                            args.cache_dtype))
        return 0
    section = run(args.model, [float(e) for e in args.edits.split(",")], args.repeats, args.dense_repeats,
                  args.threads, args.small, args.size, args.cache_dtype)
    print(section)
    if args.write:
        with open(args.write, "a") as f:
            f.write(section + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
