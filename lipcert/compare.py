"""Run several methods on one model, each in its own process with its own time limit, and
relate every upper bound to the empirical lower bound."""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from typing import Any

from .estimators import Bound, get_estimator, run_estimator
from .ir.graph import Graph

DEFAULT_METHODS = ("naive", "gram", "lipsdp", "local", "exact")


def default_methods(norm: str) -> list[str]:
    """compare's default list: the methods of DEFAULT_METHODS that support ``norm``."""
    from .estimators import get_estimator

    return [m for m in DEFAULT_METHODS if norm in get_estimator(m).norms]


def _child(graph: Graph, method: str, norm: str, options: dict, out: mp.Queue) -> None:
    try:
        out.put(("ok", run_estimator(graph, method, norm, **options)))
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: the parent reports
        return
    except BaseException as exc:  # report, never hang the parent
        out.put(("error", f"{type(exc).__name__}: {exc}"))


def run_with_timeout(graph: Graph, method: str, norm: str, options: dict,
                     timeout: float | None) -> Bound:
    """Run one method in a fresh process; a method past its time limit is stopped.

    ``spawn``, not ``fork``: a child forked after torch started its OpenMP pool can deadlock.
    """
    start = time.perf_counter()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(graph, method, norm, options, out), daemon=True)
    proc.start()
    try:
        kind, payload = out.get(timeout=timeout)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C: stop the child too, then stop
        proc.terminate()
        proc.join(2)
        raise
    except queue.Empty:
        proc.terminate()
        proc.join(5)
        return Bound(method=method, norm=norm, upper=None, time_s=time.perf_counter() - start,
                     notes=[f"timed out after {timeout:g} s (raise --timeout or the method's "
                            "timeout in the config)"], details={"timed_out": True})
    proc.join(5)
    if kind == "error":
        return Bound(method=method, norm=norm, upper=None, time_s=time.perf_counter() - start,
                     notes=[f"failed: {payload}"], details={"error": payload})
    return payload


def compare(graph: Graph, methods: list[str], norm: str, *, options: dict[str, dict],
            timeout: float | None, region: dict | None = None,
            progress: Callable[[str], None] | None = None,
            self_check: bool = True) -> tuple[list[Bound], Bound]:
    """Bounds of every method plus the lower bound (computed first, within the region)."""
    region_opts = dict(region or {})
    lower = run_with_timeout(graph, "lower", norm, {**options.get("lower", {}), **region_opts},
                             timeout)
    results = []
    for method in methods:
        if progress:
            progress(method)
        try:
            estimator = get_estimator(method)
        except Exception as exc:
            results.append(Bound(method=method, norm=norm, upper=None, notes=[str(exc)],
                                 details={"not_applicable": True}))
            continue
        method_opts = {**options.get(method, {})}
        limit = method_opts.pop("timeout", timeout)
        if estimator.accepts_region:  # box-scoped methods bound the compared region
            method_opts.update(region_opts)
        if estimator.deadline is not None and limit is not None:  # stop by itself in time
            key, share = estimator.deadline
            chosen = estimator.parse_settings(method_opts)
            method_opts[key] = min(float(getattr(chosen, key)), share * float(limit))
        method_opts["self_check"] = self_check
        results.append(run_with_timeout(graph, method, norm, method_opts, limit))
    return results, lower


def tightness(upper: float | None, lower: float | None) -> tuple[float | None, str]:
    """Ratio upper / lower and a word for it."""
    if upper is None or lower is None or lower <= 0:
        return None, "-"
    ratio = upper / lower
    if not math.isfinite(ratio):
        return ratio, "unbounded"
    label = ("tight" if ratio < 1.05 else "good" if ratio < 2 else "fair" if ratio < 10
             else "loose")
    shown = f"x{ratio:.2f}" if ratio < 100 else f"x{ratio:.0e}".replace("e+0", "e").replace(
        "e+", "e")
    return ratio, f"{shown} {label}"


def best_sound(results: list[Bound]) -> Bound | None:
    sound = [r for r in results if r.sound and r.upper is not None]
    return min(sound, key=lambda r: r.upper) if sound else None


def compare_payload_rows(results: list[Bound], lower: Bound) -> list[dict[str, Any]]:
    rows = []
    best = best_sound(results)
    for r in results:
        ratio, label = tightness(r.upper, lower.lower)
        row = r.to_json()
        row.update({"lower_bound": lower.lower, "ratio": ratio, "tightness": label,
                    "best": r is best})
        rows.append(row)
    return rows
