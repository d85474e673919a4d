"""Serving (sigec.apps.serve) through a real local Ray instance, small SPADE engine, 2 replicas.

Results through the server equal a local engine's bit for bit (ort backend, 1 thread on both
sides); every request of a session reaches the replica that primed it; replicas evict their least
recently used sessions under the cache bound, which then answer "session expired, prime again"
while the other sessions go on unaffected. One Ray instance for the module, shut down at its end.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Before Ray is imported: no usage report, and a local instance that talks on 127.0.0.1 only.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import httpx
import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="the serve extra is not installed (pip install 'sigec[serve]')")
serve = pytest.importorskip("ray.serve", reason="the serve extra is not installed (pip install 'sigec[serve]')")

import sigec  # noqa: E402
from helpers import free_port, small_spade_engine  # noqa: E402
from sigec import CacheError, InputError  # noqa: E402
from sigec.apps import zoo  # noqa: E402
from sigec.apps.serve import Client  # noqa: E402
from sigec.apps.serve.app import APP_NAME, build_app  # noqa: E402

REPLICAS = 2
ENTRIES_PER_REPLICA = 3.5  # the cache bound of each replica, in primed sessions of this engine
CACHE_DTYPE = "float32"  # the replicas load the (float16-cache) engine with float32 caches: `sigec serve --cache-dtype`




@pytest.fixture(scope="module")
def spade(tmp_path_factory):
    """The small SPADE engine file and its example label map (one-hot [1, 35, 64, 128])."""
    _, inputs = zoo.build("spade", small=True)
    return small_spade_engine(tmp_path_factory), inputs["label"]


@pytest.fixture(scope="module")
def server(spade):
    """A client of the application deployed on a local Ray instance (2 CPUs, no dashboard)."""
    path, _ = spade
    entry_bytes = sigec.load(path, cache_dtype=CACHE_DTYPE).expected_entry_bytes()
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(str(path), replicas=REPLICAS, threads=1, max_cache_bytes=int(ENTRIES_PER_REPLICA * entry_bytes),
                            cache_dtype=CACHE_DTYPE), name=APP_NAME, route_prefix="/")
        with Client(f"http://127.0.0.1:{port}") as client:
            client.wait_ready(timeout=120)
            yield client
    finally:
        ray.shutdown()  # ends Serve's actors too


def edit(labels, box: tuple[int, int, int, int], new_class: int) -> np.ndarray:
    """The label map with ``box`` (top, left, bottom, right) relabelled, as the engine's input."""
    return zoo.edit_label_map(labels, box, new_class).numpy()


def box_mask(box: tuple[int, int, int, int], shape: tuple[int, int] = (64, 128)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[box[0]:box[2], box[1]:box[3]] = True
    return mask


def test_results_equal_a_local_engine_bit_for_bit(server, spade):
    path, labels = spade
    local = sigec.load(path, threads=1, cache_dtype=CACHE_DTYPE)
    original = {"label": labels.numpy()}
    first, second = (20, 40, 30, 56), (8, 90, 16, 104)
    session = server.open()

    np.testing.assert_array_equal(server.prime(session, original), local.prime(original))
    assert server.last.path == "full" and server.last.replica
    edited = {"label": edit(labels, first, 23)}
    compiled = sigec.load(path, threads=1)  # the engine's own (float16) caches give other bits
    compiled.prime(original)
    assert not np.array_equal(compiled.run(edited, mask=box_mask(first)), local.run(edited, mask=box_mask(first)))
    for mask in (box_mask(first), None):  # a given mask, and the mask found from the difference
        np.testing.assert_array_equal(server.run(session, edited, mask=mask), local.run(edited, mask=mask))
        assert server.last.path == local.stats.path == "sparse"
    # update_cache: the edit becomes the original of the next run.
    np.testing.assert_array_equal(server.run(session, edited, update_cache=True),
                                  local.run(edited, update_cache=True))
    both = {"label": zoo.edit_label_map(torch.from_numpy(edited["label"]), second, 7).numpy()}
    np.testing.assert_array_equal(server.run(session, both), local.run(both))
    # A second cache key in the same session, and the dense model.
    np.testing.assert_array_equal(server.prime(session, both, key=3), local.prime(both, key=3))
    np.testing.assert_array_equal(server.run_dense(both), local.run_dense(both))
    assert server.last.path == "dense"

    server.close(session)
    with pytest.raises(CacheError, match="closed"):
        server.run(session, edited)


def test_bad_requests_raise_what_a_local_engine_raises(server, spade):
    _, labels = spade
    session = server.open()
    with pytest.raises(CacheError, match="prime it first"):
        server.run(session, {"label": labels.numpy()})
    with pytest.raises(InputError, match="shape"):
        server.prime(session, {"label": np.zeros((1, 35, 32, 32), np.float32)})
    with pytest.raises(InputError, match="unknown input"):
        server.prime(session, {"image": labels.numpy()})
    response = httpx.post(f"{server.url}/sessions/{session}/prime", content=b"not an npz", timeout=60)
    assert response.status_code == 400 and response.json()["error"] == "InputError"
    too_big = bytes(server.info()["max_request_bytes"] + 1)  # refused by the ingress while it reads
    response = httpx.post(f"{server.url}/sessions/{session}/prime", content=too_big, timeout=60)
    assert response.status_code == 400 and "exceeds" in response.json()["message"]
    with pytest.raises(CacheError, match="unknown session"):
        server.run("no-such-session", {"label": labels.numpy()})
    server.close(session)


def test_every_request_of_a_session_reaches_the_replica_that_primed_it(server, spade):
    _, labels = spade
    original = {"label": labels.numpy()}
    sessions = [server.open() for _ in range(4)]
    primed_on = {}
    for session in sessions:
        server.prime(session, original)
        primed_on[session] = server.last.replica
    assert len(set(primed_on.values())) == REPLICAS, f"sessions were not spread over the replicas: {primed_on}"

    def edits(session: str) -> list[str]:
        """Five edits of one session, in order; the replica of each answer."""
        replicas = []
        for step in range(5):
            box = (4 + 8 * step, 10 + 20 * step, 12 + 8 * step, 26 + 20 * step)
            server.run(session, {"label": edit(labels, box, 11 + step)}, mask=box_mask(box))
            replicas.append(server.last.replica)
        return replicas

    with ThreadPoolExecutor(len(sessions)) as pool:  # the sessions' requests interleave
        answered_by = dict(zip(sessions, pool.map(edits, sessions)))
    for session in sessions:
        assert answered_by[session] == [primed_on[session]] * 5
        server.close(session)


def test_least_recently_used_sessions_expire_and_others_are_unaffected(server, spade):
    path, labels = spade
    local = sigec.load(path, threads=1, cache_dtype=CACHE_DTYPE)
    original = {"label": labels.numpy()}
    box = (24, 48, 36, 64)
    edited = {"label": edit(labels, box, 5)}
    local.prime(original)
    expected = local.run(edited, mask=box_mask(box))

    with ThreadPoolExecutor(8) as pool:  # any placement will do here
        sessions = list(pool.map(lambda _: server.open(), range(8)))
    by_replica: dict[str, list[str]] = {}
    for session in sessions:
        server.prime(session, original)
        by_replica.setdefault(server.last.replica, []).append(session)
    kept = int(ENTRIES_PER_REPLICA)
    expired = [s for primed in by_replica.values() for s in primed[:-kept]]
    alive = [s for primed in by_replica.values() for s in primed[-kept:]]
    assert expired, f"8 sessions on {REPLICAS} replicas holding {kept} each: some must have expired ({by_replica})"

    for session in expired:
        with pytest.raises(CacheError, match="expired.*prime again"):
            server.run(session, edited, mask=box_mask(box))
    for session in alive:
        np.testing.assert_array_equal(server.run(session, edited, mask=box_mask(box)), expected)
    # An expired session primed again works again (and evicts the least recently used one in turn).
    server.prime(expired[0], original)
    np.testing.assert_array_equal(server.run(expired[0], edited, mask=box_mask(box)), expected)
    for session in sessions:
        server.close(session)
