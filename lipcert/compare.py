"""Run several methods on one model, each in a child process under its own time limit
(method_worker.py), and relate every upper bound to the empirical lower bound."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .estimators import Bound, get_estimator
from .ir.graph import Graph
from .method_worker import MethodWorker

#: compare's defaults per norm. local (box-scoped) is a linf default, where it is the
#: method that certifies; in l2 it is asked for by name (--methods ...,local): by default
#: it would bound the domain box, which global l2 rows are not rated against anyway
DEFAULT_METHODS = {"2": ("naive", "gram", "lipsdp"),
                   "inf": ("naive", "gram", "lipsdp", "local", "exact")}


def default_methods(norm: str) -> list[str]:
    """compare's default list: the methods of DEFAULT_METHODS[norm] that support it."""
    from .estimators import get_estimator

    return [m for m in DEFAULT_METHODS[norm] if norm in get_estimator(m).norms]


def compare(graph: Graph, methods: list[str], norm: str, *, options: dict[str, dict],
            timeout: float | None, region: dict | None = None,
            progress: Callable[[str, str | None], None] | None = None,
            self_check: bool = True,
            worker: MethodWorker | None = None) -> tuple[list[Bound], Bound]:
    """Bounds of every method plus the lower bound (computed first, within the region).

    ``progress(method, line)``: called with line None when a method starts, then with the
    method's own progress lines.

    ``worker``: a MethodWorker already launched by the caller (it stays open); by default
    one is started here and closed at the end.
    """
    region_opts = dict(region or {})
    with contextlib.nullcontext(worker) if worker is not None else MethodWorker() as worker:
        lower = worker.run(graph, "lower", norm, {**options.get("lower", {}), **region_opts},
                           timeout)
        results = [_run_method(worker, graph, method, norm, options, timeout, region_opts,
                               progress, self_check) for method in methods]
    return results, lower


def _run_method(worker: MethodWorker, graph: Graph, method: str, norm: str,
                options: dict[str, dict], timeout: float | None, region_opts: dict,
                progress: Callable[[str, str | None], None] | None,
                self_check: bool) -> Bound:
    """One row of compare: the method's own options, the region, a deadline inside its limit."""
    if progress:
        progress(method, None)
    try:
        estimator = get_estimator(method)
    except Exception as exc:
        return Bound(method=method, norm=norm, upper=None, notes=[str(exc)],
                     details={"not_applicable": True})
    method_opts = {**options.get(method, {})}
    limit = method_opts.pop("timeout", timeout)
    if estimator.accepts_region:  # box-scoped methods bound the compared region
        method_opts.update(region_opts)
    if estimator.deadline is not None and limit is not None:  # stop by itself in time
        key, share = estimator.deadline
        chosen = estimator.parse_settings(method_opts)
        method_opts[key] = min(float(getattr(chosen, key)), share * float(limit))
    method_opts["self_check"] = self_check
    return worker.run(graph, method, norm, method_opts, limit,
                      None if progress is None else lambda line: progress(method, line))


def tightness(upper: float | None, lower: float | None) -> tuple[float | None, str]:
    """Ratio upper / lower and a word for it."""
    if upper is None or lower is None or not lower > 0:  # NaN fails
        return None, "-"
    ratio = upper / lower
    if not math.isfinite(ratio):
        return ratio, "unbounded"
    label = ("tight" if ratio < 1.05 else "good" if ratio < 2 else "fair" if ratio < 10
             else "loose")
    shown = f"x{ratio:.2f}" if ratio < 100 else f"x{ratio:.0e}".replace("e+0", "e").replace(
        "e+", "e")
    return ratio, f"{shown} {label}"


def best_sound(results: list[Bound], region_given: bool = True) -> Bound | None:
    """The tightest certificate. Without a compared region, box-scoped bounds (on their
    default box) answer another question than global ones: the best is then a global bound
    when there is one."""
    sound = [r for r in results if r.sound and r.upper is not None]
    if not region_given and any(r.scope == "global" for r in sound):
        sound = [r for r in sound if r.scope == "global"]
    return min(sound, key=lambda r: r.upper) if sound else None


@dataclass(frozen=True)
class LowerEvidence:
    """A value at most the true constant on ``region`` ("global" or the compared box): the
    sampled yardstick, or a value a method attained (local's leaf LPs and the Jacobian at the
    centre, exact's MIP incumbent)."""

    value: float
    source: str
    region: str


_SOURCES = {"lower": "sampled", "local": "local's attained value",
            "exact": "exact's attained incumbent"}


def _region_key(bound: Bound, region_given: bool) -> str:
    """Where a bound holds: every box-scoped method of one compare run bounds the compared
    region when one is given, else its own default box (named by its description)."""
    if bound.scope == "global":
        return "global"
    if region_given:
        return "region"
    return (bound.region or {}).get("describe", bound.method)


def lower_evidence(results: list[Bound], lower: Bound, region_given: bool) -> list[LowerEvidence]:
    """Every finite positive lower value the run produced, largest first (an infinite one
    would rate every bound "tight")."""
    def usable(value: float | None) -> bool:  # a finite number > 0 (NaN and inf fail)
        return value is not None and 0 < value < math.inf

    found = []
    if usable(lower.lower):
        found.append(LowerEvidence(lower.lower, _SOURCES["lower"],
                                   "region" if region_given else "global"))
    for r in results:
        if usable(r.lower) and r.method != "lower":
            found.append(LowerEvidence(r.lower, _SOURCES.get(r.method,
                                                             f"{r.method}'s attained value"),
                                       _region_key(r, region_given)))
    return sorted(found, key=lambda e: -e.value)


def best_lower_for(bound: Bound, evidence: list[LowerEvidence],
                   region_given: bool) -> LowerEvidence | None:
    """The largest lower value that applies to ``bound``'s scope: any value for a global bound
    (a constant on a box is at most the global one), only values on the same box for a
    box-scoped one (a global sample may lie outside it)."""
    key = _region_key(bound, region_given)
    for e in evidence:  # largest first
        if key == "global" or e.region == key:
            return e
    return None


def compare_payload_rows(results: list[Bound], lower: Bound,
                         region_given: bool = False) -> list[dict[str, Any]]:
    rows = []
    best = best_sound(results, region_given)
    evidence = lower_evidence(results, lower, region_given)
    for r in results:
        used = best_lower_for(r, evidence, region_given)
        ratio, label = tightness(r.upper, used.value if used else None)
        row = r.to_json()
        row.update({"lower_bound": used.value if used else None,
                    "lower_bound_source": used.source if used else None,
                    "ratio": ratio, "tightness": label, "best": r is best})
        rows.append(row)
    return rows


def best_lower(results: list[Bound], lower: Bound, region_given: bool) -> LowerEvidence | None:
    """The largest lower value of the run: a lower bound on the global constant, and on the
    compared region's when one is given (a box constant is at most the global one)."""
    evidence = lower_evidence(results, lower, region_given)
    return evidence[0] if evidence else None
