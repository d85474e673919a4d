"""A readers-writer lock for one cache entry.

Contract: any number of readers, or one writer, hold the lock at a time. A writer that is waiting
blocks new readers (readers already inside finish first), so a stream of runs cannot starve an
update or a re-prime. The lock is not reentrant: a thread that holds it must not acquire it again.
"""

from __future__ import annotations

import threading


class ReadWriteLock:
    """Many readers or one writer; waiting writers go before new readers."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        """Block until no writer holds or waits for the lock, then hold it shared."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        """Release a shared hold."""
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        """Block until no reader or writer holds the lock, then hold it exclusively."""
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            except BaseException:
                # interrupted while waiting (e.g. KeyboardInterrupt): readers held back by this
                # writer must be woken, or they would wait for a writer that never comes
                self._writers_waiting -= 1
                self._cond.notify_all()
                raise
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        """Release an exclusive hold."""
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    def acquire(self, *, write: bool) -> None:
        """``acquire_write`` if ``write`` else ``acquire_read``."""
        (self.acquire_write if write else self.acquire_read)()

    def release(self, *, write: bool) -> None:
        """``release_write`` if ``write`` else ``release_read``."""
        (self.release_write if write else self.release_read)()
