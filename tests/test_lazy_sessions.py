"""The DENSE session is created on first use (runtime/backends.py LAZY_SESSIONS): an ONNX Runtime
session holds its own prepacked copy of the weights, and DENSE runs only for large edits."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort

import sigec
from helpers import rel_err
from sigec.runtime.backends import LazyRunner

TOLERANCE = 1e-5  # relative max error, engine vs ONNX Runtime on the original model


def test_dense_session_is_created_by_the_first_dense_run_only(zoo_model, zoo_engine_path):
    model = zoo_model("tiny_local")
    engine = sigec.load(zoo_engine_path("tiny_local", "exact"), threads=1)
    engine.dense_fallback_fraction = float("inf")
    dense = engine._runners["dense"]
    assert isinstance(dense, LazyRunner) and not dense.created
    original = {k: v.numpy() for k, v in model.example.items()}
    engine.prime(original)
    edited = {k: v.copy() for k, v in original.items()}
    name = next(iter(edited))
    edited[name][..., 4:7, 9:12] += 1.0
    engine.run(edited)
    assert engine.stats.path == "sparse" and not dense.created
    expected = ort.InferenceSession(model.proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, edited)[0]
    out = engine.run_dense(edited)[0]
    assert dense.created and rel_err(out, expected) <= TOLERANCE


def test_concurrent_first_runs_create_one_runner():
    made = []

    class _Runner:
        def run(self, feeds, names):
            return [feeds["x"] * 2]

    def make():
        made.append(1)
        return _Runner()

    lazy = LazyRunner(make, ["x"])
    results = []
    threads = [threading.Thread(target=lambda: results.append(lazy.run({"x": np.ones(2)}, ["y"])[0])) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and len(results) == 8 and all((r == 2).all() for r in results)
    assert not hasattr(LazyRunner(make, ["x"]), "forget")  # optional hooks do not create the runner
    assert len(made) == 1
