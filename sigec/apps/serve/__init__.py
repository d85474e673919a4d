"""Serving an engine over HTTP: ``sigec serve ENGINE`` (Ray Serve, docs/serving.md) and its client.

``Client`` (``sigec.apps.serve.Client``) needs httpx; the server (``app``, ``cli``) needs the
``serve`` extra (``pip install 'sigec[serve]'``). Importing this package imports neither.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "ReplyInfo"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `sigec serve` can report a missing extra itself instead of an ImportError here.
    if name in __all__:
        from sigec.apps.serve import client

        return getattr(client, name)
    raise AttributeError(f"module 'sigec.apps.serve' has no attribute {name!r}")
