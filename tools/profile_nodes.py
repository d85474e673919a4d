"""Per-node kernel times of a sparse run, and what a fused gather prologue / scatter epilogue could absorb.

Usage: python tools/profile_nodes.py ENGINE [--edit 0.002] [--runs 20] [--threads 2] [--top 15]

Profiles ``--runs`` sparse runs (after one warm-up run, dropped) of a centred square edit of ``--edit``
of the image (random normal inputs, seed 0, as tools/profile_sparse.py) with ONNX Runtime's
profiler, and takes for every node of the graph ONNX Runtime ran (its NCHWc ``ReorderInput`` /
``ReorderOutput`` included) the **median** of its kernel times over the runs. On a shared machine
the mean is dominated by preemptions (each run loses a few ms inside random kernels); the median
is the node's own cost. Prints markdown tables:

- totals: wall and ``model_run`` per run (medians), kernel sums of the per-node medians, means
  and minima, node counts (engine SPARSE graph, graph ONNX Runtime ran);
- kernel time per op type and the top nodes (shapes from the profiler);
- reorders by neighbour (a ``ReorderInput`` by its producer, a ``ReorderOutput`` by its consumers);
- the groups a fusion could absorb (``groups``): identity gathers (window = step = tile, offset 0, no
  upsampling: a copy of ``vals``) in front of 1x1 convolutions with their exclusive reorders, the SE
  gate ``Mul`` on tiles with the identity gather after it, the incremental global pooling chains
  (old-tile gather, Sub, ReduceSum, Mul, Reshape, Add), window gathers by prologue activation, the
  remaining reorders, and the rest by op type. Every node lands in exactly one group.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from sigec.core.engine_file import read_engine
from sigec.runtime.backends import OPTIMIZED_SUFFIX, make_runners
from sigec.runtime.engine import Engine
from sigec.runtime.synthetic_edits import edit_inputs, square_mask


@dataclass
class NodeProfile:
    """Kernel times per node of the graph ONNX Runtime ran (ms per run) and what the run looked like."""

    edit: float
    median_ms: dict[str, float]
    mean_ms: dict[str, float]
    min_ms: dict[str, float]
    shapes: dict[str, tuple[list, list]]  # node -> (input shapes, output shapes)
    ops: dict[str, str]  # node -> op type, as the profiler names it
    graph: onnx.GraphProto  # the optimised SPARSE graph (no weights)
    engine_nodes: int  # nodes of the engine's SPARSE graph
    wall_ms: float
    model_run_ms: float
    active_tiles: dict[str, int] = field(default_factory=dict)
    mac_reduction: float = 0.0

    @property
    def kernel_ms(self) -> float:
        """Sum of the per-node medians."""
        return sum(self.median_ms.values())


def _shapes(args: dict[str, Any], key: str) -> list:
    return [next(iter(entry.values())) for entry in args.get(key, [])]


def profile(path: str | os.PathLike, *, edit: float = 0.002, runs: int = 20, threads: int | None = 2,
            seed: int = 0) -> NodeProfile:
    """Profile ``runs`` sparse runs (plus one warm-up) of ``edit`` on the engine at ``path`` (ONNX Runtime)."""
    contents = read_engine(path)
    manifest = contents.manifest
    graphs = {k: onnx.ModelProto.FromString(v) for k, v in contents.graphs.items()}
    with tempfile.TemporaryDirectory(prefix="sigec-nodes-") as tmp:
        prefix = os.path.join(tmp, "sparse")
        runners = make_runners("ort", graphs, contents.weights, threads=threads, profile={"sparse": prefix})
        engine = Engine(manifest, runners, dense_fallback_fraction=float("inf"))
        rng = np.random.default_rng(seed)
        original = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in manifest["inputs"]}
        height, width = manifest["mask_program"]["input_size"]
        mask = square_mask(height, width, edit)
        edited = edit_inputs(original, [i["name"] for i in manifest["inputs"] if i["spatial"]], mask)
        engine.prime(original)
        walls = []
        for _ in range(runs + 1):
            start = time.perf_counter()
            engine.run(edited, mask=mask)
            walls.append((time.perf_counter() - start) * 1e3)
        with open(runners["sparse"].session.end_profiling()) as handle:
            events = json.load(handle)
        graph = onnx.load(prefix + OPTIMIZED_SUFFIX, load_external_data=False).graph
    windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                     if e.get("cat") == "Session" and e["name"] == "model_run")[1:]  # drop the warm-up run
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    shapes: dict[str, tuple[list, list]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        if not any(begin <= e["ts"] <= end for begin, end in windows):
            continue
        name = e["name"][: -len("_kernel_time")]
        per_node[name].append(e["dur"] / 1e3)
        shapes[name] = (_shapes(e["args"], "input_type_shape"), _shapes(e["args"], "output_type_shape"))
        ops[name] = e["args"].get("op_name", "?")
    count = max(len(windows), 1)
    return NodeProfile(
        edit=edit,
        median_ms={n: statistics.median(v) for n, v in per_node.items()},
        mean_ms={n: sum(v) / count for n, v in per_node.items()},
        min_ms={n: min(v) for n, v in per_node.items()},
        shapes=shapes, ops=ops, graph=graph, engine_nodes=len(graphs["sparse"].graph.node),
        wall_ms=statistics.median(walls[1:]),
        model_run_ms=statistics.median((end - begin) / 1e3 for begin, end in windows) if windows else 0.0,
        active_tiles=dict(engine.stats.active_tiles), mac_reduction=engine.stats.mac_reduction)


# ---------------------------------------------------------------------------------------------- graph helpers


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in values.items()}


def _links(graph: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    return producer, consumers


def is_identity_gather(node: onnx.NodeProto) -> bool:
    """A TileGather that copies ``vals``: window = step, offset 0, no upsampling, ``vals`` on the same
    resolution as the output tiles, no ``scale`` / ``shift`` (an activation may be set)."""
    if node.op_type != "TileGather" or len(node.input) < 4 or not node.input[1]:
        return False
    a = _attrs(node)
    same_grid = node.input[2].rpartition("::")[2] == node.input[3].rpartition("::")[2]
    return (list(a["window"]) == list(a["step"]) and list(a.get("offset", [0, 0])) == [0, 0]
            and a.get("upsample", 1) == 1 and same_grid and not any(node.input[4:]))


def groups(p: NodeProfile) -> dict[str, tuple[float, collections.Counter]]:
    """Kernel time (sum of per-node medians) and op counts of each group (see the module docstring)."""
    producer, consumers = _links(p.graph)
    taken: set[str] = set()
    result: dict[str, list] = collections.defaultdict(lambda: [0.0, collections.Counter()])

    def take(group: str, nodes: list[onnx.NodeProto | None]) -> None:
        for n in nodes:
            if n is not None and n.name not in taken:
                taken.add(n.name)
                result[group][0] += p.median_ms.get(n.name, 0.0)
                result[group][1][n.op_type] += 1

    def exclusive_reorder(value: str) -> list[onnx.NodeProto]:
        src = producer.get(value)
        return [src] if src is not None and src.op_type == "ReorderOutput" and len(consumers[value]) == 1 else []

    for n in p.graph.node:
        if n.op_type != "TileGather":
            continue
        after = [c for c in consumers[n.output[0]] if c.op_type == "ReorderInput"]
        activation = _attrs(n).get("activation", "none")
        if len(n.input) < 2 or not n.input[1]:  # reads the cache (or a model input) only
            if not is_identity_gather(n) and list(_attrs(n)["window"]) != list(_attrs(n)["step"]):
                take(f"window gather of a model input or cache, activation {activation}, + ReorderInput", [n, *after])
            continue  # the pooling chains' old-tile gathers: below
        src = producer.get(n.input[1])
        if is_identity_gather(n) and src is not None and src.op_type == "Mul":
            gate = [r for i in src.input for r in exclusive_reorder(i)]
            take("SE gate Mul on tiles -> identity gather (1x1 conv) + reorders", [src, n, *after, *gate])
        elif is_identity_gather(n):
            take(f"identity gather (1x1 conv / ConvTranspose), activation {activation}, + exclusive reorders",
                 [n, *after, *exclusive_reorder(n.input[1])])
        elif _attrs(n).get("upsample", 1) > 1:
            take("upsampling gather (nearest), + ReorderInput", [n, *after])
        else:
            take(f"window gather, activation {activation}, + ReorderInput", [n, *after])
    chain_ops = {"Sub", "ReduceSum", "Mul", "Reshape", "Add", "ReorderInput"}
    for n in p.graph.node:
        if n.op_type != "TileGather" or (len(n.input) > 1 and n.input[1]) or not (
                list(_attrs(n)["window"]) == list(_attrs(n)["step"])):
            continue
        chain, todo = [n], [n]
        while todo:
            for c in consumers[todo.pop().output[0]]:
                gate_mul = c.op_type == "Mul" and any(
                    producer.get(i) is not None and producer[i].op_type == "ReorderOutput" for i in c.input)
                if c.op_type in chain_ops and c not in chain and not gate_mul:
                    chain.append(c)
                    if c.op_type != "ReorderInput":
                        todo.append(c)
        take("incremental pooling: old-tile gather, Sub, ReduceSum, Mul, Reshape, Add, + reorder", chain)
    for n in p.graph.node:
        if n.op_type in ("ReorderInput", "ReorderOutput"):
            take(f"other reorders ({n.op_type})", [n])
    for n in p.graph.node:
        take(f"rest: {n.op_type}", [n])
    for name, op in p.ops.items():  # nodes the saved graph names differently (fused after it was saved)
        if name not in taken:
            taken.add(name)
            result[f"rest: {op}"][0] += p.median_ms.get(name, 0.0)
            result[f"rest: {op}"][1][op] += 1
    return {k: (v[0], v[1]) for k, v in result.items()}


# ---------------------------------------------------------------------------------------------- tables


def totals_table(p: NodeProfile) -> str:
    mean, low = sum(p.mean_ms.values()), sum(p.min_ms.values())
    return "\n".join([
        "| wall ms | model_run ms | kernel sum ms (medians) | (means) | (minima) | engine SPARSE nodes "
        "| nodes ONNX Runtime ran | MAC reduction | active tiles |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {p.wall_ms:.2f} | {p.model_run_ms:.2f} | {p.kernel_ms:.2f} | {mean:.2f} | {low:.2f} | {p.engine_nodes} | "
        f"{len(p.graph.node)} | {p.mac_reduction:.1f}x | "
        + ", ".join(f"{k} {v}" for k, v in p.active_tiles.items()) + " |"])


def op_table(p: NodeProfile) -> str:
    by_op: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for name, ms in p.median_ms.items():
        by_op[p.ops[name]] += ms
        count[p.ops[name]] += 1
    lines = ["| op type | ms per run (medians) | share | nodes |", "|---|---|---|---|"]
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {op} | {ms:.2f} | {ms / p.kernel_ms * 100:.1f}% | {count[op]} |")
    return "\n".join(lines)


def top_table(p: NodeProfile, top: int) -> str:
    nodes = {n.name: n for n in p.graph.node}
    lines = ["| ms | op | node | output shape | attributes |", "|---|---|---|---|---|"]
    for name, ms in sorted(p.median_ms.items(), key=lambda kv: -kv[1])[:top]:
        node = nodes.get(name)
        keep = ("window", "step", "upsample", "activation", "kernel_shape", "strides", "group")
        attrs = {k: v for k, v in _attrs(node).items() if k in keep} if node is not None else {}
        text = ", ".join(f"{k}={list(v) if isinstance(v, (list, tuple)) else v}" for k, v in attrs.items())
        out = p.shapes.get(name, ([], []))[1]
        lines.append(f"| {ms:.3f} | {p.ops[name]} | `{name}` | {out[0] if out else ''} | {text} |")
    return "\n".join(lines)


def reorder_table(p: NodeProfile) -> str:
    producer, consumers = _links(p.graph)
    outputs = {o.name for o in p.graph.output}
    ms: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter = collections.Counter()
    for n in p.graph.node:
        if n.op_type == "ReorderInput":
            src = producer.get(n.input[0])
            key = f"ReorderInput after {src.op_type if src is not None else 'a graph input'}"
        elif n.op_type == "ReorderOutput":
            dst = sorted({c.op_type for c in consumers[n.output[0]]})
            dst = dst or (["graph output"] if n.output[0] in outputs else [])
            key = f"ReorderOutput before {' + '.join(dst)}"
        else:
            continue
        ms[key] += p.median_ms.get(n.name, 0.0)
        count[key] += 1
    lines = ["| reorder | nodes | ms per run (medians) |", "|---|---|---|"]
    for key, value in sorted(ms.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {key} | {count[key]} | {value:.2f} |")
    return "\n".join(lines)


def group_table(p: NodeProfile) -> str:
    lines = ["| group | ms per run (medians) | share | nodes |", "|---|---|---|---|"]
    for name, (ms, ops) in sorted(groups(p).items(), key=lambda kv: -kv[1][0]):
        lines.append(f"| {name} | {ms:.2f} | {ms / p.kernel_ms * 100:.1f}% | "
                     + ", ".join(f"{op} {c}" for op, c in sorted(ops.items())) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("engine", help="engine file (.sigec)")
    parser.add_argument("--edit", type=float, default=0.002, help="edited fraction of the image (a centred square)")
    parser.add_argument("--runs", type=int, default=20, help="profiled sparse runs (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--top", type=int, default=15, help="how many of the slowest nodes to list")
    args = parser.parse_args(argv)
    if not 0.0 < args.edit <= 1.0 or args.runs < 1:
        parser.error("--edit must lie in (0, 1] and --runs be at least 1")
    p = profile(args.engine, edit=args.edit, runs=args.runs, threads=args.threads)
    print(f"edit {args.edit:.1%}, {args.threads} threads, medians of {args.runs} profiled runs\n")
    for title, table in (("totals", totals_table(p)), ("by op type", op_table(p)),
                         (f"top {args.top} nodes", top_table(p, args.top)), ("reorders by neighbour", reorder_table(p)),
                         ("groups", group_table(p))):
        print(f"{title}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
