"""Progress of long work, reported from wherever it happens.

A method's deep loops (a solver call, a golden-section search, first-order steps) cannot
all be handed a callback; :func:`reporting` installs the caller's callback (the CLI's status
line, compare's child process) for the duration of one method run, and :func:`report` sends
it one line of text. Without a callback, reporting costs nothing. :class:`Countdown` adds
an estimate of the time left where the steps are alike (the same matrix size every step),
which is the only case where such an estimate is honest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_callback: ContextVar[Callable[[str], None] | None] = ContextVar("lipcert_progress",
                                                                 default=None)


@contextmanager
def reporting(callback: Callable[[str], None] | None) -> Iterator[None]:
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)


def report(text: str) -> None:
    callback = _callback.get()
    if callback is not None:
        callback(text)


def active() -> bool:
    return _callback.get() is not None


class Countdown:
    """Reports ``what k/n, ~T s left``, the time left estimated from the steps so far."""

    def __init__(self, what: str, total: int):
        self.what, self.total, self.done = what, total, 0
        self.start = time.perf_counter()

    def step(self, extra: str = "") -> None:
        self.done += 1
        self.total = max(self.total, self.done)  # an estimate that ran short
        if not active():
            return
        elapsed = time.perf_counter() - self.start
        left = elapsed / self.done * (self.total - self.done)
        text = f"{self.what} {self.done}/{self.total}"
        if self.done >= 2 and left >= 1:
            text += f", ~{left:.0f} s left"
        report(text + (f", {extra}" if extra else ""))
