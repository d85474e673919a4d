"""The Ray Serve application: a FastAPI ingress in front of engine replicas multiplexed by session.

Two deployments (protocol: docs/serving.md):

- ``sigec_engine`` (N replicas): each loads the engine file once and keeps the caches of the
  sessions it primed, bounded by ``max_cache_bytes`` (least recently used sessions are evicted).
  A session id is a Ray Serve *multiplexed model id*: the replica that opened a session registers
  the id (``@serve.multiplexed``), and Serve's router sends every later request carrying that id to
  it. One engine call runs at a time per replica (each with the engine's ``threads``).
- ``sigec_ingress`` (stateless): the HTTP routes; forwards each session request to the engine
  deployment with the session id as multiplexed model id, the painting page (GET /) and /healthz.

Serve's router learns which replica holds an id a moment (about 0.1-0.5 s) after the replica
registered it. A request that reaches a replica not holding its session is answered "not here"
without touching anything, and the ingress sends it again until it reaches the holder (within
``ROUTING_RETRY_S``); only then is a session unknown.
"""

# No `from __future__ import annotations` here: FastAPI must see the route parameters' real types
# (a string annotation of `request: Request` is not resolved through Serve's class-based ingress).

import asyncio
import json
import re
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

import sigec
from sigec.core.errors import BackendError, CacheError, InputError, SigecError
from sigec.apps.serve.protocol import (ENGINE_MS_HEADER, MASK_NAME, NPZ_MEDIA_TYPE, PATH_HEADER, REPLICA_HEADER,
                                       SESSION_HEADER, decode_arrays, encode_arrays, error_body, status_of)

APP_NAME = "sigec"
ENGINE_DEPLOYMENT = "sigec_engine"
INGRESS_DEPLOYMENT = "sigec_ingress"
NOT_HERE = 421  # internal only: the replica does not hold the session; the ingress routes again
ROUTING_RETRY_S = 5.0
PROBES_IN_A_ROW = 3
ROUTING_SETTLE_S = 0.5
# Open sessions a replica holds (past it Serve's multiplexer forgets the least recently used one,
# which then expires like an evicted session), and closed ones it remembers as closed.
SESSIONS_PER_REPLICA = 1024
# Engine requests queued per replica before Serve's router calls the replica busy and looks
# elsewhere, which would break session affinity: far above any expected queue.
MAX_ONGOING_PER_REPLICA = 256
# How often a stopping replica checks whether its requests are done (Serve's default: 2 s).
SHUTDOWN_POLL_S = 0.25
SESSION_ID = re.compile(r"^[0-9a-f]{32}$")
PAGE = Path(__file__).with_name("static") / "index.html"


@dataclass
class Reply:
    """What an engine replica answers: an HTTP status, a body and headers (the ingress sends it on)."""

    status: int
    body: bytes
    media_type: str = NPZ_MEDIA_TYPE
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of_json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> "Reply":
        return cls(status, json.dumps(payload).encode(), "application/json", dict(headers or {}))

    @classmethod
    def of_error(cls, exc: SigecError, headers: dict[str, str] | None = None) -> "Reply":
        return cls(status_of(exc), error_body(exc), "application/json", dict(headers or {}))

    def response(self) -> Response:
        return Response(self.body, status_code=self.status, media_type=self.media_type, headers=self.headers)


class Session:
    """One client's session on a replica: the cache keys it primed (engine key ``(id, key)``)."""

    def __init__(self, session_id: str, release: Callable[["Session"], None]) -> None:
        self.id = session_id
        self.primed: set[str] = set()
        self._release = release

    def __del__(self) -> None:
        # Serve's multiplexer calls __del__ when it forgets the session (least recently used);
        # the garbage collector may call it again later: release is idempotent.
        try:
            self._release(self)
        except Exception:  # never raise from a finaliser (interpreter shutdown)
            pass


def engine_input_bytes(manifest: dict[str, Any]) -> int:
    """A bound on a request's uncompressed arrays: the inputs as float64/int64 plus an int64 mask."""
    total = 0
    for spec in manifest["inputs"]:
        total += int(np.prod(spec["shape"])) * 8
    height, width = manifest["mask_program"]["input_size"]
    return total + int(manifest.get("batch", 1)) * int(height) * int(width) * 8 + (1 << 16)


@serve.deployment(name=ENGINE_DEPLOYMENT, max_ongoing_requests=MAX_ONGOING_PER_REPLICA,
                  graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
class EngineReplica:
    """Holds one loaded engine and the sessions this replica opened."""

    def __init__(self, engine_path: str, threads: int | None, max_cache_bytes: int | None,
                 cache_dtype: str | None = None) -> None:
        self._engine = sigec.load(engine_path, threads=threads, max_cache_bytes=max_cache_bytes,
                                  cache_dtype=cache_dtype)
        self._max_cache_bytes = max_cache_bytes
        self._max_body = engine_input_bytes(self._engine.manifest)
        self._sessions: dict[str, Session] = {}
        self._closed: OrderedDict[str, None] = OrderedDict()  # recently closed ids, to say "closed"
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sigec-engine")
        self._replica = serve.get_replica_context().replica_id.unique_id

    @serve.multiplexed(max_num_models_per_replica=SESSIONS_PER_REPLICA)
    async def _session(self, session_id: str) -> Session:
        """Create the session (called by the multiplexer the first time this replica sees the id)."""
        session = Session(session_id, self._release)
        self._sessions[session_id] = session
        return session

    def _release(self, session: Session) -> None:
        """Free a session's caches and forget it (idempotent)."""
        for key in list(session.primed):
            self._engine.drop((session.id, key))
        session.primed.clear()
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def _unregister(self, session_id: str) -> None:
        """Take a closed session's id off the ids this replica reports to Serve's router.

        Serve places a new id on a replica with the fewest ids, so closed sessions must not count.
        Serve has no public call for it (its multiplexer forgets ids only by LRU): best effort on
        the multiplexer's state; if that ever changes, closed ids linger until the LRU drops them.
        """
        multiplexer = getattr(self, "__serve_multiplex_wrapper", None)
        models = getattr(multiplexer, "models", None)
        if isinstance(models, dict) and models.pop(session_id, None) is not None:
            multiplexer._push_multiplexed_replica_info = True

    def info(self) -> dict[str, Any]:
        """The engine's inputs and outputs (name, shape, dtype, spatial) and its mask size."""
        manifest = self._engine.manifest
        return {"inputs": manifest["inputs"], "outputs": manifest["outputs"], "mode": manifest["mode"],
                "mask_size": manifest["mask_program"]["input_size"], "max_request_bytes": self._max_body}

    async def session(self, op: str, key: str, body: bytes = b"", update_cache: bool = False) -> Reply:
        """Serve one session request (``op``: open, probe, prime, run, close) for the request's session id."""
        session_id = serve.get_multiplexed_model_id()
        headers = {REPLICA_HEADER: self._replica, SESSION_HEADER: session_id}
        if op == "open":
            await self._session(session_id)
            return Reply.of_json(201, {"session": session_id, "replica": self._replica}, headers)
        if session_id in self._closed:
            return Reply.of_error(CacheError(f"session {session_id} was closed; open a new one"), headers)
        if session_id not in self._sessions:
            return Reply(NOT_HERE, b"", "text/plain", headers)
        if op == "probe":
            return Reply(200, b"", "text/plain", headers)
        session = await self._session(session_id)  # marks it recently used
        if op == "close":
            self._release(session)
            self._unregister(session_id)
            self._closed[session_id] = None
            while len(self._closed) > SESSIONS_PER_REPLICA:
                self._closed.popitem(last=False)
            return Reply.of_json(200, {"closed": session_id}, headers)
        loop = asyncio.get_running_loop()
        call = self._prime if op == "prime" else self._run
        return await loop.run_in_executor(self._pool, call, session, key, body, update_cache, headers)

    async def dense(self, body: bytes) -> Reply:
        """Run the dense model on the request's inputs (no session)."""
        headers = {REPLICA_HEADER: self._replica}
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._dense, body, headers)

    def _prime(self, session: Session, key: str, body: bytes, update_cache: bool, headers: dict[str, str]) -> Reply:
        try:
            arrays = decode_arrays(body, max_bytes=self._max_body)
            start = time.perf_counter()
            outputs = self._engine.prime(arrays, key=(session.id, key))
            elapsed = (time.perf_counter() - start) * 1e3
            session.primed.add(key)
            return self._outputs(outputs, headers, "full", elapsed)
        except SigecError as exc:
            return Reply.of_error(self._explain(exc, session, key), headers)
        except Exception as exc:
            return Reply.of_error(BackendError(f"prime failed: {type(exc).__name__}: {exc}"), headers)

    def _run(self, session: Session, key: str, body: bytes, update_cache: bool, headers: dict[str, str]) -> Reply:
        try:
            arrays = decode_arrays(body, max_bytes=self._max_body)
            mask = arrays.pop(MASK_NAME, None)
            if key not in session.primed:
                raise CacheError(f"session {session.id} has no primed cache for key {key!r}: prime it first")
            start = time.perf_counter()
            outputs = self._engine.run(arrays, mask=mask, key=(session.id, key), update_cache=update_cache)
            elapsed = (time.perf_counter() - start) * 1e3
            stats = self._engine.stats
            return self._outputs(outputs, headers, stats.path if stats else "sparse", elapsed)
        except SigecError as exc:
            return Reply.of_error(self._explain(exc, session, key), headers)
        except Exception as exc:
            return Reply.of_error(BackendError(f"run failed: {type(exc).__name__}: {exc}"), headers)

    def _dense(self, body: bytes, headers: dict[str, str]) -> Reply:
        try:
            arrays = decode_arrays(body, max_bytes=self._max_body)
            arrays.pop(MASK_NAME, None)
            start = time.perf_counter()
            outputs = self._engine.run_dense(arrays)
            return self._outputs(outputs, headers, "dense", (time.perf_counter() - start) * 1e3)
        except SigecError as exc:
            return Reply.of_error(exc, headers)
        except Exception as exc:
            return Reply.of_error(BackendError(f"dense run failed: {type(exc).__name__}: {exc}"), headers)

    def _outputs(self, outputs: list[np.ndarray], headers: dict[str, str], path: str, engine_ms: float) -> Reply:
        body = encode_arrays(dict(zip(self._engine.output_names, outputs)))
        return Reply(200, body, NPZ_MEDIA_TYPE, {**headers, PATH_HEADER: path, ENGINE_MS_HEADER: f"{engine_ms:.3f}"})

    def _explain(self, exc: SigecError, session: Session, key: str) -> SigecError:
        """A cache error about an evicted key becomes "session expired, prime again"."""
        engine_key = (session.id, key)
        if isinstance(exc, CacheError) and key in session.primed and engine_key not in self._engine.cache_keys():
            bound = f"{self._max_cache_bytes / 2**20:.1f} MiB" if self._max_cache_bytes else "its bound"
            return CacheError(f"session {session.id} expired: its cache for key {key!r} was evicted (least recently "
                              f"used) to keep replica {self._replica} under {bound}; prime again")
        return exc


def _label_ids(classes: int, height: int, width: int, seed: int) -> np.ndarray:
    """Class ids [H, W] of ``zoo.random_label_map`` (imports PyTorch, so only when the page asks)."""
    from sigec.apps.zoo.label_maps import random_label_map

    one_hot = random_label_map(1, classes, height, width, seed=seed)
    return one_hot[0].argmax(dim=0).numpy().astype(np.uint8)


api = FastAPI(title="sigec", description="Incremental image generation: sessions, prime, run (docs/serving.md)")


@api.exception_handler(SigecError)
async def _sigec_error(request: Request, exc: SigecError) -> Response:
    """A SigecError raised by a route becomes the protocol's JSON error."""
    return Reply.of_error(exc).response()


@serve.deployment(name=INGRESS_DEPLOYMENT, max_ongoing_requests=4 * MAX_ONGOING_PER_REPLICA,
                  ray_actor_options={"num_cpus": 0}, graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S)
@serve.ingress(api)
class Ingress:
    """HTTP routes; session requests go to the replica holding the session (module docstring)."""

    def __init__(self, engines: DeploymentHandle, replicas: int) -> None:
        self._engines = engines
        self._replicas = replicas
        self._info: dict[str, Any] | None = None

    async def _engine_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._engines.info.remote()
        return self._info

    async def _body(self, request: Request) -> bytes:
        """The request body; ``InputError`` as soon as it exceeds what the engine's inputs can hold."""
        limit = int((await self._engine_info())["max_request_bytes"])
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise InputError(f"the request body exceeds {limit} bytes, more than this engine's inputs can hold")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _call(self, session_id: str, op: str, key: str = "default", body: bytes = b"",
                    update_cache: bool = False) -> Reply:
        """Send a session request until it reaches the replica holding the session (module docstring)."""
        if not SESSION_ID.match(session_id):
            return Reply.of_error(CacheError(f"unknown session {session_id!r} (ids are 32 hex digits from "
                                             f"POST /sessions)"))
        handle = self._engines.options(multiplexed_model_id=session_id)
        deadline = time.monotonic() + ROUTING_RETRY_S
        delay = 0.02
        while True:
            reply: Reply = await handle.session.remote(op, key, body, update_cache)
            if reply.status != NOT_HERE:
                return reply
            if time.monotonic() > deadline:
                return Reply.of_error(CacheError(
                    f"unknown session {session_id}: no replica holds it (never opened, closed and forgotten, or "
                    f"its replica restarted); open a new session"))
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.25)

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        """The painting page."""
        return HTMLResponse(PAGE.read_text())

    @api.get("/healthz")
    async def healthz(self) -> Response:
        """200 once every engine replica is running, else 503."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(APP_NAME)
        running = 0
        if app is not None and ENGINE_DEPLOYMENT in app.deployments:
            states = app.deployments[ENGINE_DEPLOYMENT].replica_states
            running = sum(int(n) for state, n in states.items() if getattr(state, "value", state) == "RUNNING")
        ready = app is not None and app.status == "RUNNING" and running >= self._replicas
        return Reply.of_json(200 if ready else 503, {"ready": ready, "replicas": running,
                                                     "wanted": self._replicas}).response()

    @api.get("/info")
    async def info(self) -> Response:
        """The engine's inputs and outputs and the number of replicas."""
        return Reply.of_json(200, {**await self._engine_info(), "replicas": self._replicas}).response()

    @api.get("/example")
    async def example(self, seed: int = 0) -> Response:
        """A label map for the page: class ids [H, W] (uint8) of the zoo's random map (SPADE's example for seed 0)."""
        info = await self._engine_info()
        spatial = [i for i in info["inputs"] if i["spatial"]]
        if len(spatial) != 1 or len(spatial[0]["shape"]) != 4 or not 1 < spatial[0]["shape"][1] <= 256:
            return Reply.of_error(InputError("this engine's input is not a one-hot label map")).response()
        _, classes, height, width = spatial[0]["shape"]
        labels = await asyncio.to_thread(_label_ids, classes, height, width, seed)
        return Reply(200, encode_arrays({"labels": labels})).response()

    @api.post("/sessions")
    async def open_session(self) -> Response:
        """Open a session on the least loaded replica; answers {"session": id, "replica": ...} once routable."""
        session_id = uuid.uuid4().hex
        reply = await self._call(session_id, "open")
        # Wait (bounded) until Serve's router knows the replica of the id: then the first prime needs
        # no retry, and the next open sees this replica's new session count (Serve opens a new id on
        # a replica with the fewest). The replica reports its ids every 0.1 s and the controller
        # passes them on; a probe reaching the holder proves little (before the router knows, it
        # may land there by chance), hence probes in a row and a minimum wait.
        opened = time.monotonic()
        handle = self._engines.options(multiplexed_model_id=session_id)
        in_a_row = 0
        while time.monotonic() < opened + ROUTING_RETRY_S:
            probe: Reply = await handle.session.remote("probe", "default")
            in_a_row = in_a_row + 1 if probe.status == 200 else 0
            if in_a_row >= PROBES_IN_A_ROW and time.monotonic() >= opened + ROUTING_SETTLE_S:
                break
            await asyncio.sleep(0.05)
        return reply.response()

    @api.post("/sessions/{session_id}/prime")
    async def prime(self, session_id: str, request: Request, key: str = "default") -> Response:
        """Prime the session's cache ``key`` with the inputs (.npz); answers the outputs (.npz)."""
        return (await self._call(session_id, "prime", key, await self._body(request))).response()

    @api.post("/sessions/{session_id}/run")
    async def run(self, session_id: str, request: Request, key: str = "default",
                  update_cache: bool = False) -> Response:
        """Run edited inputs (.npz, optional mask) incrementally against the session's cache ``key``."""
        return (await self._call(session_id, "run", key, await self._body(request), update_cache)).response()

    @api.delete("/sessions/{session_id}")
    async def close(self, session_id: str) -> Response:
        """Close the session and free its caches."""
        return (await self._call(session_id, "close")).response()

    @api.post("/dense")
    async def dense(self, request: Request) -> Response:
        """Run the dense model on the inputs (.npz): the baseline a sparse run is compared with."""
        reply: Reply = await self._engines.dense.remote(await self._body(request))
        return reply.response()


def build_app(engine_path: str, *, replicas: int = 1, threads: int | None = 1,
              max_cache_bytes: int | None = None, replica_cpus: float | None = None,
              cache_dtype: str | None = None) -> serve.Application:
    """The application for ``serve.run``: ``replicas`` engine replicas of ``engine_path``.

    ``threads``: ONNX Runtime threads per replica; ``max_cache_bytes``: the bound on each replica's
    caches; ``replica_cpus``: the CPUs Ray reserves per replica (default ``threads``);
    ``cache_dtype``: the caches' precision, as ``sigec.load(cache_dtype=)`` (None: the engine's).
    """
    if replicas < 1:
        raise InputError(f"replicas must be >= 1, got {replicas}")
    cpus = float(replica_cpus if replica_cpus is not None else (threads or 1))
    engines = EngineReplica.options(num_replicas=replicas, ray_actor_options={"num_cpus": cpus})
    return Ingress.bind(engines.bind(str(Path(engine_path).resolve()), threads, max_cache_bytes, cache_dtype),
                        replicas)
