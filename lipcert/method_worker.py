"""A child process that runs methods one after another, each under its own time limit.

compare runs every method away from the main process so that one past its time limit can
be stopped (a solver inside C code cannot be interrupted otherwise). Starting a process
costs seconds (``spawn`` re-imports torch), so one worker serves all methods in turn and is
replaced only when a method has to be stopped, or when the process died under it (killed
for memory, a crash in native code): that is reported as the method's failure, never
waited out as a time-out.

``spawn``, not ``fork``: a child forked after torch started its OpenMP pool can deadlock.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the module stays light: the caller launches a worker before importing torch
    from .estimators import Bound
    from .ir.graph import Graph

#: how long a fresh worker may take to import lipcert before it is reported as broken
START_LIMIT_S = 300.0
#: the shortest interval between two progress lines sent to the parent
PROGRESS_EVERY_S = 0.2


class _Forward:
    """A method's progress callback in the worker: sends its lines to the parent, at most
    one per PROGRESS_EVERY_S (a loop may report every step)."""

    def __init__(self, conn) -> None:
        self._conn, self._last = conn, -math.inf

    def __call__(self, text: str) -> None:
        now = time.perf_counter()
        if now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            self._conn.send(("progress", str(text)))


def _serve(conn) -> None:
    """The worker's loop: one (graph, method, norm, options, wants_progress) task at a
    time; progress lines, then one answer, go back."""
    try:
        from .estimators import load_all, run_estimator

        load_all()  # every method's imports, while the parent loads the model
        conn.send(("ready", None))
        while True:
            graph, method, norm, options, wants_progress = conn.recv()
            if wants_progress:
                options = {**options, "progress": _Forward(conn)}
            try:
                answer = ("ok", run_estimator(graph, method, norm, **options))
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # report, never hang the parent
                answer = ("error", f"{type(exc).__name__}: {exc}")
            conn.send(answer)
    except (KeyboardInterrupt, EOFError, BrokenPipeError):
        return  # Ctrl-C reached the process group, or the parent went: the parent reports


def _failed(method: str, norm: str, start: float, note: str, **details: Any) -> Bound:
    from .estimators import Bound

    return Bound(method=method, norm=norm, upper=None, time_s=time.perf_counter() - start,
                 notes=[note], details=details)


class MethodWorker:
    """Runs methods in one reusable child process (a context manager; ``close`` stops it)."""

    def __init__(self) -> None:
        self._proc = None
        self._conn = None
        self._ready = False

    @property
    def pid(self) -> int | None:
        """The worker's process id (None before launch and after a stop)."""
        return None if self._proc is None else self._proc.pid

    def __enter__(self) -> MethodWorker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def launch(self) -> MethodWorker:
        """Start the process without waiting for it (its imports overlap the caller's work,
        e.g. loading the model); ``run`` waits until it is ready."""
        if self._proc is None:
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child,), daemon=True)
            proc.start()
            child.close()
            self._proc, self._conn, self._ready = proc, parent, False
        return self

    def _start(self) -> str | None:
        """A ready worker, or why there is none."""
        self.launch()
        if self._ready:
            return None
        parent, proc = self._conn, self._proc
        if parent not in wait([parent, proc.sentinel], START_LIMIT_S):
            self._stop()
            return f"the worker process did not start within {START_LIMIT_S:g} s"
        try:
            parent.recv()
        except (EOFError, OSError):
            code = proc.exitcode
            self._stop()
            return f"the worker process ended while starting (exit code {code})"
        self._ready = True
        return None

    def _stop(self) -> None:
        """Stop the worker at once (a method past its limit, or a broken process)."""
        if self._proc is not None:
            self._proc.terminate()
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._ready = False

    def close(self) -> None:
        """Stop the worker: every answer has been received, so nothing is lost (waiting for
        its interpreter to wind down would cost a second or more)."""
        self._stop()

    def _died(self, method: str, norm: str, start: float) -> Bound:
        """The method's row when its process ended without answering."""
        self._proc.join(5)
        code = self._proc.exitcode
        self._stop()
        why = (f"the process running it ended without a result (exit code {code}"
               + ("; killed, e.g. for memory)" if code is not None and code < 0 else ")"))
        return _failed(method, norm, start, f"failed: {why}", error=why)

    def run(self, graph: Graph, method: str, norm: str, options: dict,
            timeout: float | None,
            progress: Callable[[str], None] | None = None) -> Bound:
        """Run one method; past ``timeout`` seconds it is stopped and reported as timed out.

        The limit counts from the moment the method is handed over, not the worker's start.
        ``progress`` receives the method's own progress lines (at most a few per second).
        """
        start = time.perf_counter()
        if self._proc is not None and not self._proc.is_alive():
            self._stop()
        why = self._start()
        if why is not None:
            return _failed(method, norm, start, f"failed: {why}", error=why)
        start = time.perf_counter()
        deadline = None if timeout is None else start + timeout
        try:
            self._conn.send((graph, method, norm, options, progress is not None))
        except (OSError, ValueError):  # the pipe broke: the process is gone
            return self._died(method, norm, start)
        while True:
            left = None if deadline is None else max(0.0, deadline - time.perf_counter())
            try:
                if not wait([self._conn, self._proc.sentinel], left):
                    self._stop()
                    return _failed(method, norm, start,
                                   f"timed out after {timeout:g} s (raise --timeout or the "
                                   "method's timeout in the config)", timed_out=True)
                kind, payload = self._conn.recv()
            except (KeyboardInterrupt, SystemExit):  # Ctrl-C: stop the child too, then stop
                self._stop()
                raise
            except (EOFError, OSError):  # no answer: killed, or a native crash
                return self._died(method, norm, start)
            if kind != "progress":
                break
            progress(payload)  # outside the pipe's error handling: its errors are its own
        if kind == "error":
            return _failed(method, norm, start, f"failed: {payload}", error=payload)
        return payload
