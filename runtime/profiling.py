"""Where a sparse run's time goes, per op type and per resolution (ONNX Runtime's profiler).

Used by ``tools/profile_sparse.py`` (the breakdowns in BENCHMARKS.md) and by ``sigec.autotune``,
which picks a tile size (or dense execution) per resolution from these numbers.

Kernel times are attributed to resolutions as follows:

1. The graph ONNX Runtime actually ran (saved next to the profile, layout reorders included) is
   walked in order.
2. SPARSE graph: a node reading a ``tiles::coords::<res>`` or ``tiles::grid::<res>`` input belongs
   to that resolution. DENSE graph: a node the manifest reports with a resolution belongs to it.
3. Any other node belongs to the resolution of its first input that has one; nodes reached by
   none (static values, shapes) count as ``"other"``.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx

from sigec.core.engine_file import read_engine
from sigec.core.names import tile_input_resolution
from sigec.runtime.backends import OPTIMIZED_SUFFIX, make_runners
from sigec.runtime.engine import Engine
from sigec.runtime.synthetic_edits import edit_inputs, square_mask

OTHER = "other"


@dataclass
class GraphProfile:
    """Kernel time of one graph, in milliseconds per run."""

    by_op: dict[str, float] = field(default_factory=dict)
    by_resolution: dict[str, float] = field(default_factory=dict)
    by_resolution_op: dict[tuple[str, str], float] = field(default_factory=dict)
    nodes_by_op: dict[str, int] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        """All kernel time per run."""
        return sum(self.by_op.values())


@dataclass
class EngineProfile:
    """A sparse run and a dense run of the same edited input, profiled."""

    edit: float
    sparse: GraphProfile
    dense: GraphProfile
    sparse_wall_ms: float
    active_fraction: dict[str, float]
    active_tiles: dict[str, int]
    mac_reduction: float


def node_resolutions(model: onnx.ModelProto, seeds: Mapping[str, str] | None = None,
                     value_seeds: Mapping[str, str] | None = None) -> dict[str, str]:
    """Resolution name of every node (by node name; see the module docstring). ``seeds``: node name ->
    resolution known beforehand (the manifest's reports, for the DENSE graph); ``value_seeds``: the
    same for values (the spatial inputs)."""
    seeds = seeds or {}
    value_res: dict[str, str] = dict(value_seeds or {})
    for value in model.graph.input:
        res = tile_input_resolution(value.name)
        if res:
            value_res[value.name] = res
    result: dict[str, str] = {}
    for node in model.graph.node:
        own = [value_res[i] for i in node.input if tile_input_resolution(i) and i in value_res]
        inherited = [value_res[i] for i in node.input if i in value_res]
        res = seeds.get(node.name) or (own or inherited or [None])[0]
        if res is None:
            continue
        result[node.name] = res
        for out in node.output:
            value_res[out] = res
    return result


def aggregate(profile_path: str, runs: int, resolution_of: Mapping[str, str]) -> GraphProfile:
    """Aggregate an ONNX Runtime profile (``resolution_of``: node name -> resolution)."""
    with open(profile_path) as handle:
        events = json.load(handle)
    out = GraphProfile()
    by_op: dict[str, float] = collections.defaultdict(float)
    by_res: dict[str, float] = collections.defaultdict(float)
    by_res_op: dict[tuple[str, str], float] = collections.defaultdict(float)
    nodes: dict[str, set] = collections.defaultdict(set)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        op = event["args"].get("op_name", "?")
        node = event["name"][: -len("_kernel_time")]
        res = resolution_of.get(node, OTHER)
        ms = event["dur"] / 1e3 / runs
        by_op[op] += ms
        by_res[res] += ms
        by_res_op[(res, op)] += ms
        nodes[op].add(node)
    out.by_op = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    out.by_resolution = dict(by_res)
    out.by_resolution_op = dict(by_res_op)
    out.nodes_by_op = {op: len(names) for op, names in nodes.items()}
    return out


def profile_engine(path: str | os.PathLike, *, edit: float = 0.012, runs: int = 3, threads: int | None = 2,
                   seed: int = 0) -> EngineProfile:
    """Profile ``runs`` sparse and dense runs of a centred square edit of ``edit`` of the image
    (random original inputs, noise added in the square) on ONNX Runtime."""
    contents = read_engine(path)
    graphs = {k: onnx.ModelProto.FromString(v) for k, v in contents.graphs.items()}
    with tempfile.TemporaryDirectory(prefix="sigec-profile-") as tmp:
        prefixes = {"sparse": os.path.join(tmp, "sparse"), "dense": os.path.join(tmp, "dense")}
        runners = make_runners("ort", graphs, contents.weights, threads=threads, profile=prefixes)
        engine = Engine(contents.manifest, runners, dense_fallback_fraction=2.0)  # always sparse
        rng = np.random.default_rng(seed)
        original = {i["name"]: rng.standard_normal(i["shape"]).astype(i["dtype"]) for i in contents.manifest["inputs"]}
        height, width = contents.manifest["mask_program"]["input_size"]
        mask = square_mask(height, width, edit)
        spatial = [i["name"] for i in contents.manifest["inputs"] if i["spatial"]]
        edited = edit_inputs(original, spatial, mask)
        engine.prime(original)
        walls = []
        for _ in range(runs):
            engine.run(edited, mask=mask)
            walls.append(engine.stats.wall_ms)
            engine.run_dense(edited)
        stats = engine.stats
        seeds = {n["name"]: n["resolution"] for n in contents.manifest["nodes"] if n.get("resolution")}
        input_res = {i["name"]: f"r{i['shape'][2]}x{i['shape'][3]}" for i in contents.manifest["inputs"] if i["spatial"]}
        profiles = {}
        for name in ("sparse", "dense"):
            optimized = onnx.load(prefixes[name] + OPTIMIZED_SUFFIX, load_external_data=False)
            resolution_of = node_resolutions(optimized, *((seeds, input_res) if name == "dense" else ()))
            profiles[name] = aggregate(runners[name].session.end_profiling(), runs, resolution_of)
        sparse, dense = profiles["sparse"], profiles["dense"]
    return EngineProfile(edit=edit, sparse=sparse, dense=dense, sparse_wall_ms=float(np.median(walls)),
                         active_fraction=dict(stats.active_fraction), active_tiles=dict(stats.active_tiles),
                         mac_reduction=stats.mac_reduction)
