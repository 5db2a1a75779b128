"""SIGTERM and SIGINT: a clean exception for short commands, a request to stop for training.

By default SIGTERM ends Python at once, so ``finally`` blocks never remove temporary files; a scheduler sends it
before pre-emption. :func:`raising_on_signals` turns both signals into :class:`Interrupted` (prepare, export:
their temporary files are removed on the way out); :class:`StopRequests` only records the first one, so
training can finish its step and write a checkpoint (a second signal raises at once). Exit code ``128 + signal
number``, the shell's convention: 143 for SIGTERM, 130 for SIGINT.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM or SIGINT, raised where the process was (``signum``: which one)."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = int(signum)
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _install(handler) -> dict:
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return {}
    return {signum: signal.signal(signum, handler) for signum in SIGNALS}


def _restore(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@contextlib.contextmanager
def raising_on_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted` in the main thread."""

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = _install(handler)
    try:
        yield
    finally:
        _restore(previous)


class StopRequests:
    """Within the block (a context manager), the first SIGTERM or SIGINT sets ``signum`` and nothing else;
    a second one raises :class:`Interrupted` (someone wants the process gone now)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        if self.signum is not None:
            raise Interrupted(signum)
        self.signum = signum

    def __enter__(self) -> StopRequests:
        self._previous = _install(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        _restore(self._previous)
        self._previous = {}
