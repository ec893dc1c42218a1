"""compare's worker process: reused across methods, replaced after a time-out, and a process
that dies under a method is reported at once as that method's failure (not waited out)."""

from __future__ import annotations

import os
import signal
import threading
import time

from helpers import MODELS

import lipcert
from lipcert.method_worker import MethodWorker

MLP = MODELS / "digits_mlp.onnx"
LONG = {"solver": "scs", "time_limit": float("inf")}  # an SDP that runs for minutes


def test_worker_is_reused_replaced_after_a_timeout_and_reports_a_killed_process():
    graph = lipcert.load(MLP)
    with MethodWorker() as worker:
        first = worker.run(graph, "naive", "2", {}, 60)
        pid = worker.pid
        assert first.upper is not None and first.upper > 0
        again = worker.run(graph, "naive", "inf", {}, 60)
        assert worker.pid == pid and again.upper is not None  # the same process served both

        stopped = worker.run(graph, "lipsdp", "2", dict(LONG), 2.0)
        assert stopped.upper is None and stopped.details.get("timed_out")
        assert "timed out after 2 s" in stopped.notes[-1]
        assert worker.pid is None  # stopped with its method

        after = worker.run(graph, "naive", "2", {}, 60)  # a fresh process
        assert after.upper == first.upper and worker.pid not in (None, pid)

        victim = worker.pid
        killer = threading.Timer(3.0, os.kill, (victim, signal.SIGKILL))
        killer.start()
        start = time.perf_counter()
        try:
            died = worker.run(graph, "lipsdp", "2", dict(LONG), 300)
        finally:
            killer.cancel()
        waited = time.perf_counter() - start
        assert died.upper is None and not died.details.get("timed_out")
        assert "ended without a result" in died.notes[-1] and "-9" in died.notes[-1]
        assert waited < 200, waited  # noticed when it died, not after the 300 s limit

        last = worker.run(graph, "naive", "2", {}, 60)
        assert last.upper == first.upper


def test_a_method_error_is_reported_the_worker_keeps_serving_and_forwards_progress():
    graph = lipcert.load(MLP)
    with MethodWorker() as worker:
        bad = worker.run(graph, "naive", "2", {"no_such_setting": 1}, 60)
        assert bad.upper is None and bad.details.get("error"), bad
        assert bad.notes[-1].startswith("failed: ")
        pid = worker.pid
        good = worker.run(graph, "naive", "2", {}, 60)
        assert good.upper is not None and worker.pid == pid
        seen: list[str] = []  # the method's own progress lines come back while it runs
        solved = worker.run(graph, "lipsdp", "2", {}, 120, progress=seen.append)
        assert solved.upper is not None and worker.pid == pid
        assert seen and all(isinstance(line, str) for line in seen), seen
        assert any("Newton steps" in line or "ECLipsE" in line for line in seen), seen
