"""Progress display for long operations (rich when enabled, silent otherwise)."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator


class Steps:
    """Shows each named step of a long operation with its duration."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._console = None
        if enabled:
            from rich.console import Console

            self._console = Console(stderr=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Run the body as one step, with a spinner while it runs."""
        if self._console is None:
            yield
            return
        start = time.perf_counter()
        with self._console.status(f"{name}..."):
            yield
        self._console.print(f"[green]done[/green] {name} ({time.perf_counter() - start:.1f} s)")

    def log(self, message: str) -> None:
        """A line of progress inside a step (shown only when enabled)."""
        if self._console is not None:
            self._console.print(f"  {message}")
