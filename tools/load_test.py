"""Load test of a local `sigec serve`: concurrent sessions sending edits, then dense requests.

    python tools/load_test.py http://127.0.0.1:8000 --sessions 8 --duration 60 --edit 0.012

N sessions each prime once (not timed), then send edits for ``--duration`` seconds: each edit is
a square covering ``--edit`` of the image at a random place (a label map engine: the labels inside
change to a class absent from the square; otherwise noise is added there), sent with the square as
mask, without update_cache. Then N clients send dense requests (POST /dense) for as long. Prints
throughput and p50/p99 latency of both phases and their throughput ratio.

Loopback only: the URL's host must be localhost, 127.0.0.0/8 or ::1. Bounded: at most
``--max-requests`` per phase and ``--duration`` <= 600 s per phase; requests started before the
end of a phase are waited for (each with the HTTP timeout).
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
import numpy as np

from sigec.apps.serve.protocol import (ENGINE_MS_HEADER, MASK_NAME, NPZ_MEDIA_TYPE, PATH_HEADER, REPLICA_HEADER,
                                       decode_arrays, encode_arrays)

MAX_DURATION_S = 600.0
EDITS_PER_SESSION = 4  # distinct edits each session cycles through (bodies encoded once, before timing)


def is_loopback(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Phase:
    """The requests of one phase: latencies (ms), server engine times (ms), errors, replicas, paths."""

    name: str
    latencies: list[float] = field(default_factory=list)
    engine_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    replicas: Counter = field(default_factory=Counter)
    paths: Counter = field(default_factory=Counter)
    elapsed_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, start: float, response: httpx.Response | None, error: str | None) -> None:
        with self.lock:
            if error is not None:
                self.errors.append(error)
                return
            self.latencies.append((time.perf_counter() - start) * 1e3)
            self.engine_ms.append(float(response.headers.get(ENGINE_MS_HEADER, "nan")))
            self.replicas[response.headers.get(REPLICA_HEADER, "?")] += 1
            self.paths[response.headers.get(PATH_HEADER, "?")] += 1

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.elapsed_s if self.elapsed_s else 0.0

    def summary(self) -> str:
        if not self.latencies:
            return f"{self.name}: no request completed; errors {len(self.errors)}"
        p50, p99 = np.percentile(self.latencies, [50, 99])
        engine = np.nanpercentile(self.engine_ms, 50)
        return (f"{self.name}: {len(self.latencies)} requests in {self.elapsed_s:.1f} s, errors {len(self.errors)}, "
                f"throughput {self.throughput:.2f} req/s, latency p50 {p50:.0f} ms, p99 {p99:.0f} ms, "
                f"server engine time p50 {engine:.0f} ms; paths {dict(self.paths)}; replicas {dict(self.replicas)}")


def originals(http: httpx.Client, info: dict, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], bool]:
    """The original inputs: the page's label map for a label-map engine, else random inputs."""
    response = http.get("/example")
    spatial = [s for s in info["inputs"] if s["spatial"]]
    if response.status_code == 200 and len(spatial) == 1:
        spec = spatial[0]
        ids = decode_arrays(response.content)["labels"].astype(np.int64)
        one_hot = (np.arange(spec["shape"][1])[:, None, None] == ids[None]).astype(np.float32)[None]
        return {spec["name"]: one_hot}, True
    inputs = {}
    for spec in info["inputs"]:
        inputs[spec["name"]] = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
    return inputs, False


def make_edit(inputs: dict[str, np.ndarray], info: dict, fraction: float, label_map: bool,
              rng: np.random.Generator) -> bytes:
    """An encoded edit request: a random square of ``fraction`` of the image, and its mask."""
    height, width = info["mask_size"]
    side_h = max(1, round(height * np.sqrt(fraction)))
    side_w = max(1, round(width * np.sqrt(fraction)))
    top, left = int(rng.integers(0, height - side_h + 1)), int(rng.integers(0, width - side_w + 1))
    region = (slice(top, top + side_h), slice(left, left + side_w))
    edited = {name: array.copy() for name, array in inputs.items()}
    for spec in info["inputs"]:
        if not spec["spatial"]:
            continue
        array = edited[spec["name"]]
        if label_map:
            present = array[0][(slice(None), *region)].reshape(array.shape[1], -1).any(axis=1)
            absent = np.flatnonzero(~present)
            new_class = int(rng.choice(absent)) if absent.size else 0
            array[(slice(None), slice(None), *region)] = 0.0
            array[(slice(None), new_class, *region)] = 1.0
        else:
            array[(slice(None), slice(None), *region)] += rng.standard_normal(
                array[(slice(None), slice(None), *region)].shape).astype(array.dtype)
    mask = np.zeros((height, width), dtype=bool)
    mask[region] = True
    return encode_arrays({**edited, MASK_NAME: mask})


def run_phase(phase: Phase, workers: list, duration: float, max_requests: int) -> None:
    """Run ``workers`` (callables sending one request each) in closed loops for ``duration`` seconds."""
    start = time.perf_counter()
    deadline = start + duration
    budget = [max_requests]
    budget_lock = threading.Lock()

    def loop(send) -> None:
        while time.perf_counter() < deadline:
            with budget_lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            send()

    with ThreadPoolExecutor(len(workers)) as pool:
        list(pool.map(loop, workers))
    phase.elapsed_s = time.perf_counter() - start


def post(http: httpx.Client, phase: Phase, url: str, body: bytes) -> None:
    start = time.perf_counter()
    try:
        response = http.post(url, content=body, headers={"Content-Type": NPZ_MEDIA_TYPE})
    except httpx.HTTPError as exc:
        phase.record(start, None, f"{type(exc).__name__}: {exc}")
        return
    if response.status_code != 200:
        phase.record(start, None, f"HTTP {response.status_code}: {response.text[:300]}")
    else:
        phase.record(start, response, None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000 (loopback only)")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions (and dense clients)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of each phase (edits, dense)")
    parser.add_argument("--edit", type=float, default=0.012, help="edited fraction of the image")
    parser.add_argument("--max-requests", type=int, default=10000, help="bound on the requests of each phase")
    parser.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout of one request (s)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    host = urlsplit(args.url).hostname or ""
    if not is_loopback(host):
        parser.error(f"refusing {host!r}: the load test only targets this machine (localhost, 127.0.0.0/8, ::1)")
    if not 0 < args.duration <= MAX_DURATION_S or not 1 <= args.sessions <= 256 or not 0 < args.edit <= 1:
        parser.error(f"need 0 < --duration <= {MAX_DURATION_S:.0f}, 1 <= --sessions <= 256, 0 < --edit <= 1")

    rng = np.random.default_rng(args.seed)
    limits = httpx.Limits(max_connections=2 * args.sessions)
    with httpx.Client(base_url=args.url.rstrip("/"), timeout=args.timeout, limits=limits) as http:
        info = http.get("/info").raise_for_status().json()
        inputs, label_map = originals(http, info, rng)
        original = encode_arrays(inputs)
        edits = [[make_edit(inputs, info, args.edit, label_map, rng) for _ in range(EDITS_PER_SESSION)]
                 for _ in range(args.sessions)]
        print(f"sigec load test: {args.url}, {info['replicas']} replica(s), {args.sessions} sessions, "
              f"{args.edit:.1%} edits ({'label map' if label_map else 'random inputs'}, mask given), "
              f"{args.duration:.0f} s per phase; inputs {[s['shape'] for s in info['inputs']]}, "
              f"request body {len(edits[0][0]) / 2**20:.1f} MiB", flush=True)

        sessions = [http.post("/sessions").raise_for_status().json()["session"] for _ in range(args.sessions)]
        priming = Phase("prime")
        start = time.perf_counter()
        with ThreadPoolExecutor(args.sessions) as pool:
            list(pool.map(lambda s: post(http, priming, f"/sessions/{s}/prime", original), sessions))
        priming.elapsed_s = time.perf_counter() - start
        print(priming.summary(), flush=True)

        edit_phase = Phase("edits")
        counters = [0] * args.sessions

        def edit_worker(i: int):
            def send() -> None:
                body = edits[i][counters[i] % EDITS_PER_SESSION]
                counters[i] += 1
                post(http, edit_phase, f"/sessions/{sessions[i]}/run", body)
            return send

        run_phase(edit_phase, [edit_worker(i) for i in range(args.sessions)], args.duration, args.max_requests)
        print(edit_phase.summary(), flush=True)

        dense_phase = Phase("dense")
        dense_body = edits[0][0]
        run_phase(dense_phase, [lambda: post(http, dense_phase, "/dense", dense_body)] * args.sessions,
                  args.duration, args.max_requests)
        print(dense_phase.summary(), flush=True)

        for session in sessions:
            http.delete(f"/sessions/{session}")
    ratio = edit_phase.throughput / dense_phase.throughput if dense_phase.throughput else float("inf")
    errors = len(priming.errors) + len(edit_phase.errors) + len(dense_phase.errors)
    print(f"edit throughput / dense throughput = {ratio:.1f}x; errors {errors}")
    for phase in (priming, edit_phase, dense_phase):
        for error in phase.errors[:3]:
            print(f"  {phase.name} error: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
