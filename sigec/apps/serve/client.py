"""``Client``: a Python client of ``sigec serve`` with the calls and errors of a local engine."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Hashable

import httpx
import numpy as np

from sigec.core.errors import BackendError, InputError, SigecError
from sigec.apps.serve.protocol import (ENGINE_MS_HEADER, MASK_NAME, NPZ_MEDIA_TYPE, PATH_HEADER, REPLICA_HEADER,
                                       decode_arrays, encode_arrays, error_from_response)


@dataclass
class ReplyInfo:
    """What the server said about the last call of this thread."""

    replica: str
    path: str
    engine_ms: float
    wall_ms: float


class Client:
    """Sessions on a sigec server (docs/serving.md); safe to share between threads.

    Raises what a local engine raises: ``InputError`` for bad inputs (HTTP 400), ``CacheError``
    for an unknown, closed or expired session (HTTP 404: "session expired ... prime again" after
    the replica evicted its caches), ``BackendError`` when the server fails or cannot be reached.
    ``last`` describes the last call of the calling thread (replica, engine path and times).
    Cache keys travel as strings: ``key=1`` and ``key="1"`` name the same cache.
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, timeout=timeout)
        self._local = threading.local()
        self._input_names: list[str] | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.disconnect()

    def disconnect(self) -> None:
        """Close the HTTP connections (sessions stay open on the server)."""
        self._http.close()

    @property
    def last(self) -> ReplyInfo | None:
        """The server's account of this thread's last call."""
        return getattr(self._local, "last", None)

    # ----- server ---------------------------------------------------------------------------
    def healthy(self) -> bool:
        """True when the server answers /healthz with 200 (every replica ready)."""
        try:
            return self._http.get("/healthz", timeout=10.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until ``healthy()``; raise ``BackendError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise BackendError(f"sigec server at {self.url} not ready after {timeout:.0f} s")
            time.sleep(0.2)

    def info(self) -> dict[str, Any]:
        """The engine's inputs and outputs (name, shape, dtype, spatial) and the number of replicas."""
        return self._request("GET", "/info").json()

    # ----- sessions -------------------------------------------------------------------------
    def open(self) -> str:
        """Open a session; returns its id."""
        return str(self._request("POST", "/sessions").json()["session"])

    def prime(self, session: str, inputs: Mapping[str, Any] | Sequence[Any], key: Hashable | None = None
              ) -> list[np.ndarray]:
        """Prime the session's cache ``key`` with the original inputs; returns the outputs."""
        return self._arrays("POST", f"/sessions/{session}/prime", self._encode(inputs), {"key": _key(key)})

    def run(self, session: str, inputs: Mapping[str, Any] | Sequence[Any], mask: np.ndarray | None = None,
            key: Hashable | None = None, update_cache: bool = False) -> list[np.ndarray]:
        """Run edited inputs incrementally against the session's cache ``key``; returns the outputs."""
        params = {"key": _key(key), "update_cache": "true" if update_cache else "false"}
        return self._arrays("POST", f"/sessions/{session}/run", self._encode(inputs, mask), params)

    def run_dense(self, inputs: Mapping[str, Any] | Sequence[Any]) -> list[np.ndarray]:
        """Run the dense model on the server (no session)."""
        return self._arrays("POST", "/dense", self._encode(inputs), {})

    def close(self, session: str) -> None:
        """Close the session and free its caches on the server."""
        self._request("DELETE", f"/sessions/{session}")

    # ----- plumbing -------------------------------------------------------------------------
    def _encode(self, inputs: Mapping[str, Any] | Sequence[Any], mask: np.ndarray | None = None) -> bytes:
        if isinstance(inputs, Mapping):
            arrays = {str(name): np.asarray(value) for name, value in inputs.items()}
        else:
            if self._input_names is None:
                self._input_names = [spec["name"] for spec in self.info()["inputs"]]
            values = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
            arrays = {name: np.asarray(v) for name, v in zip(self._input_names, values)}
        if mask is not None:
            arrays[MASK_NAME] = np.asarray(mask)
        return encode_arrays(arrays)

    def _arrays(self, method: str, path: str, body: bytes, params: dict[str, str]) -> list[np.ndarray]:
        response = self._request(method, path, content=body, params=params,
                                 headers={"Content-Type": NPZ_MEDIA_TYPE})
        try:
            return list(decode_arrays(response.content).values())
        except SigecError as exc:
            raise BackendError(f"sigec server at {self.url} answered {path} with a malformed body: {exc}") from exc

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        start = time.perf_counter()
        try:
            response = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise BackendError(f"sigec server at {self.url}: {type(exc).__name__}: {exc}") from exc
        headers = response.headers
        self._local.last = ReplyInfo(replica=headers.get(REPLICA_HEADER, ""), path=headers.get(PATH_HEADER, ""),
                                     engine_ms=float(headers.get(ENGINE_MS_HEADER, "nan")),
                                     wall_ms=(time.perf_counter() - start) * 1e3)
        if response.status_code >= 300:
            raise error_from_response(response.status_code, response.content)
        return response


def _key(key: Hashable | None) -> str:
    """A cache key as sent on the wire."""
    if key is None:
        return "default"
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise InputError(f"a served cache key must be a str or int, got {key!r}")
    return str(key)
