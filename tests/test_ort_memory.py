"""ONNX Runtime's CPU memory arena and primes (runtime/backends.py, ``ARENAS``).

A FULL run outputs every cache; with the arena on, ONNX Runtime keeps the run's peak (every
intermediate and output buffer) as free arena chunks after the run, so each primed engine holds far
more than its caches (BENCHMARKS.md, "ONNX Runtime arena and primes"). FULL runs without the arena;
SPARSE and DENSE keep it (their buffers are reused run after run and the arena is faster for them).
"""

from __future__ import annotations

import json
import subprocess
import sys

import sigec
from helpers import ROOT
from sigec.runtime.backends import ARENAS

# RSS growth of N primes beyond N keys' caches (inputs and outputs included), on the full-size
# tiny_local (approx, 46 MiB per key, 256x256): measured ~12 MiB without FULL's arena, ~190 MiB with
# it; the bound is generous (allocator noise).
PRIMES = 4
EXCESS_MIB = 64.0


def test_full_runs_without_the_arena_sparse_and_dense_with_it(zoo_engine_path):
    engine = sigec.load(zoo_engine_path("tiny_local", "exact"), threads=1)
    arena = {name: runner.session.get_session_options().enable_cpu_mem_arena
             for name, runner in engine._runners.items()}
    assert arena == {"full": False, "sparse": True, "dense": True} == ARENAS


def test_arenas_can_be_chosen_per_graph(zoo_engine_path):
    import onnx

    from sigec.core.engine_file import read_engine
    from sigec.runtime.backends import make_runners

    contents = read_engine(zoo_engine_path("tiny_local", "exact"))
    graphs = {n: onnx.ModelProto.FromString(g) for n, g in contents.graphs.items()}
    runners = make_runners("ort", graphs, contents.weights, threads=1, arenas={"full": True, "sparse": False})
    assert {n: r.session.get_session_options().enable_cpu_mem_arena for n, r in runners.items()} == \
        {"full": True, "sparse": False, "dense": True}


def test_rss_growth_of_primes_stays_near_their_caches(tmp_path):
    """PRIMES primes of distinct keys in a fresh process (tools/peak_memory.py, ``--child primes``) grow
    the RSS by their caches plus at most EXCESS_MIB."""
    from sigec.apps.zoo import build

    module, example = build("tiny_local")
    path = sigec.compile(module, tmp_path / "tiny_local.sigec", inputs=example, mode="approx", progress=False)
    script = ROOT / "tools" / "peak_memory.py"
    out = subprocess.run([sys.executable, str(script), "--child", "primes", str(path), "--config", "default",
                          "--primes", str(PRIMES), "--runs", "1", "--threads", "1"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    rss = result["rss_after_primes"]
    excess = (rss[-1] - rss[0] - PRIMES * result["key_bytes"]) / 2**20
    assert result["key_bytes"] > 40 * 2**20 and result["path"] == "sparse", result
    assert excess <= EXCESS_MIB, (excess, [(b - a) / 2**20 for a, b in zip(rss, rss[1:])])
