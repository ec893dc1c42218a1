"""Ctrl-C through native solvers: a solver that catches SIGINT itself must still stop
lipcert, and nothing a C library prints may reach stdout (it would corrupt ``--json -``)."""

from __future__ import annotations

import contextlib
import os
import sys

SCS_SIGINT = -5  # SCS's status_val when its own Ctrl-C listener stopped it


@contextlib.contextmanager
def interruptible_scs():
    """SCS installs its own SIGINT handler while it solves and returns "interrupted", which
    cvxpy reports as a solver failure; its C code also prints "Failure:interrupted" on
    stdout. Inside this context an interrupted solve raises KeyboardInterrupt (the CLI then
    exits 130) and the C library's stdout goes to /dev/null."""
    try:
        import scs
    except ImportError:  # pragma: no cover - scs is a dependency
        yield
        return
    original = scs.solve

    def solve(*args, **kwargs):
        result = original(*args, **kwargs)
        if result.get("info", {}).get("status_val") == SCS_SIGINT:
            raise KeyboardInterrupt
        return result

    scs.solve = solve
    try:
        with quiet_c_stdout():
            yield
    finally:
        scs.solve = original


@contextlib.contextmanager
def quiet_c_stdout():
    """Point file descriptor 1 at /dev/null (where C libraries print), then restore it."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (embedded, captured)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
