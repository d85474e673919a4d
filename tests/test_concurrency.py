"""Concurrent calls give the results of sequential ones.

Engines use the ort backend with 1 intra-op thread per session (one test also runs the torch
backend). Every comparison is bit-exact: a session computes the same bits for the same feeds, so
any difference would come from a race in the engine (a torn cache, an update seen half-way, a mask
or tile index shared between calls).
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np
import pytest

import sigec
from sigec.runtime.tiles import scatter_tiles_inplace
from random_nets import random_local_net

SIZE = 20
THREADS = 8
RUNS = 25
KEYS = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def engine_path(tmp_path_factory):
    return sigec.compile(random_local_net(7, depth=6, size=(SIZE, SIZE)),
                         tmp_path_factory.mktemp("conc") / "local.sigec", mode="exact")


def _load(path) -> sigec.Engine:
    return sigec.load(path, threads=1)


def _original(key: str) -> np.ndarray:
    return np.random.default_rng(KEYS.index(key) if key in KEYS else 99).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)


def _random_edit(rng: np.random.Generator, x0: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """An edited input and (half of the time) its explicit mask; else the mask comes from the difference."""
    mask = np.zeros((SIZE, SIZE), bool)
    for _ in range(int(rng.integers(1, 3))):
        y, x = rng.integers(0, SIZE, 2)
        mask[y:y + int(rng.integers(1, 5)), x:x + int(rng.integers(1, 5))] = True
    edited = x0 + mask * rng.standard_normal(x0.shape).astype(np.float32)
    return edited, (mask if rng.random() < 0.5 else None)


def _run_threads(workers: list[Callable[[], None]], timeout: float = 60.0) -> None:
    """Start the workers together; fail on a worker's exception or a deadlock."""
    barrier = threading.Barrier(len(workers))
    errors: list[BaseException] = []

    def wrap(work: Callable[[], None]) -> Callable[[], None]:
        def go() -> None:
            try:
                barrier.wait()
                work()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                errors.append(exc)
        return go

    threads = [threading.Thread(target=wrap(w), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "threads still running: deadlock?"
    if errors:
        raise errors[0]


def _plan(same_key: bool) -> list[list[tuple[str, np.ndarray, np.ndarray | None]]]:
    """Per thread, RUNS requests (key, edited input, mask)."""
    plans = []
    for t in range(THREADS):
        rng = np.random.default_rng(1000 + t)
        requests = []
        for _ in range(RUNS):
            key = "a" if same_key else KEYS[int(rng.integers(0, len(KEYS)))]
            requests.append((key, *_random_edit(rng, _original(key))))
        plans.append(requests)
    return plans


def _assert_same(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("backend,same_key", [("ort", True), ("ort", False), ("torch", True)],
                         ids=["ort-same-key", "ort-different-keys", "torch-same-key"])
def test_concurrent_runs_equal_sequential_runs(engine_path, backend, same_key):
    # torch: default intra-op threads (sigec.load(threads=...) would change them for the whole process)
    engine = _load(engine_path) if backend == "ort" else sigec.load(engine_path, backend="torch")
    for key in KEYS:
        engine.prime({"x": _original(key)}, key=key)
    plans = _plan(same_key)
    expected = [[(engine.run({"x": x}, mask=m, key=k), engine.stats.path) for k, x, m in plan] for plan in plans]
    assert {path for thread in expected for _, path in thread} >= {"sparse"}
    got: list[list] = [[] for _ in plans]

    def worker(t: int) -> Callable[[], None]:
        def work() -> None:
            for k, x, m in plans[t]:
                got[t].append((engine.run({"x": x}, mask=m, key=k), engine.stats.path))  # stats: this thread's
        return work

    _run_threads([worker(t) for t in range(THREADS)])
    for t in range(THREADS):
        assert len(got[t]) == RUNS
        for (out, path), (ref, ref_path) in zip(got[t], expected[t]):
            _assert_same(out, ref)
            assert path == ref_path


def test_runs_mixed_with_updates_and_primes(engine_path):
    """6 reader threads on keys a/b, one thread updating its own key 'u' (update_cache=True), one
    thread re-priming key 'b' with its original and priming/dropping extra keys."""
    engine = _load(engine_path)
    for key in ("a", "b", "u"):
        engine.prime({"x": _original(key)}, key=key)
    readers = 6
    plans = []
    for t in range(readers):
        rng = np.random.default_rng(2000 + t)
        plans.append([(k, *_random_edit(rng, _original(k))) for k in ("a", "b") * (RUNS // 2 + 1)][:RUNS])
    expected = [[engine.run({"x": x}, mask=m, key=k) for k, x, m in plan] for plan in plans]

    # The updater's sequence, replayed on its own engine: each edit becomes the new original.
    rng = np.random.default_rng(3000)
    updates, current = [], _original("u")
    for _ in range(RUNS):
        current, mask = _random_edit(rng, current)
        updates.append((current, mask))
    replay = _load(engine_path)
    replay.prime({"x": _original("u")}, key="u")
    expected_updates = [replay.run({"x": x}, mask=m, key="u", update_cache=True) for x, m in updates]
    got: list[list] = [[] for _ in range(readers)]
    got_updates: list = []

    def reader(t: int) -> Callable[[], None]:
        def work() -> None:
            for k, x, m in plans[t]:
                got[t].append(engine.run({"x": x}, mask=m, key=k))
        return work

    def updater() -> None:
        for x, m in updates:
            got_updates.append(engine.run({"x": x}, mask=m, key="u", update_cache=True))

    def primer() -> None:
        for i in range(RUNS):
            engine.prime({"x": _original("b")}, key="b")  # same original: readers of 'b' see the same caches
            engine.prime({"x": _original("c")}, key=f"extra-{i}")
            engine.drop(f"extra-{i - 2}")

    _run_threads([reader(t) for t in range(readers)] + [updater, primer])
    for t in range(readers):
        for out, ref in zip(got[t], expected[t], strict=True):
            _assert_same(out, ref)
    for out, ref in zip(got_updates, expected_updates, strict=True):
        _assert_same(out, ref)
    for name, value in replay._store.entry("u").tensors.items():
        np.testing.assert_array_equal(engine._store.entry("u").tensors[name], value)
    assert sorted(map(str, engine.cache_keys())) == ["a", "b", "extra-23", "extra-24", "u"]


def test_readers_never_see_a_half_applied_update(engine_path):
    """A writer flips key 'f' between two originals with update_cache=True while readers run on
    'f': every reader result must be one of the results computed sequentially for the states the
    key passes through (a torn update would give something else)."""
    engine = _load(engine_path)
    x0 = _original("f")
    engine.prime({"x": x0}, key="f")
    rng = np.random.default_rng(4000)
    x1, _ = _random_edit(rng, x0)
    flip_mask = np.abs(x1 - x0).max(axis=(0, 1)) > 0
    flips = [(x1 if i % 2 == 0 else x0) for i in range(RUNS)]
    probes = [_random_edit(rng, x0) for _ in range(4)]
    probes = [(x, m if m is not None else np.abs(x - x0).max(axis=(0, 1)) > 0) for x, m in probes]

    # The states the key goes through, and what every probe gives in each state.
    replay = _load(engine_path)
    replay.prime({"x": x0}, key="f")
    allowed = [set() for _ in probes]

    def record() -> None:
        for i, (x, m) in enumerate(probes):
            allowed[i].add(tuple(o.tobytes() for o in replay.run({"x": x}, mask=m, key="f")))

    record()
    for x in flips:
        replay.run({"x": x}, mask=flip_mask, key="f", update_cache=True)
        record()
    assert all(len(a) >= 2 for a in allowed), "the probes must be able to tell the states apart"
    seen = [set() for _ in probes]

    def reader(t: int) -> Callable[[], None]:
        def work() -> None:
            for j in range(RUNS):
                i = (t + j) % len(probes)
                x, m = probes[i]
                out = tuple(o.tobytes() for o in engine.run({"x": x}, mask=m, key="f"))
                assert out in allowed[i], f"reader {t} saw a state the key never had (probe {i}, run {j})"
                seen[i].add(out)
        return work

    def slow_scatter(base: np.ndarray, vals: np.ndarray, coords: np.ndarray) -> None:
        scatter_tiles_inplace(base, vals, coords)
        time.sleep(0.002)  # widen the window in which a reader could see some caches updated, not all

    engine._scatter = slow_scatter

    def writer() -> None:
        for x in flips:
            engine.run({"x": x}, mask=flip_mask, key="f", update_cache=True)

    _run_threads([reader(t) for t in range(THREADS - 1)] + [writer])
    for name, value in replay._store.entry("f").tensors.items():
        np.testing.assert_array_equal(engine._store.entry("f").tensors[name], value)
