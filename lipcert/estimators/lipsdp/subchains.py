"""Bounding one (sub-)chain: proposals tried in order, each certified, the smallest kept;
splitting a deep chain into sub-chains whose bounds multiply."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from .certificate import certify_and_repair
from .lmi import _compress, has_output_connections, rescale
from .proposers import (
    SCS_AUTO_SECONDS,
    _eclipse_certificate,
    auto_proposers,
    eclipse_applies,
    solve_lipsdp,
)


def split_chain(weights: list[np.ndarray], slopes: list, split: int) -> list[tuple[list, list]]:
    """Sub-chains with at most ``split`` hidden layers each (0: no split); the activation
    between two sub-chains is bounded by its own Lipschitz constant."""
    if split <= 0 or len(slopes) <= split:
        return [(weights, slopes)]
    parts, start = [], 0
    while start < len(weights):
        stop = min(start + split + 1, len(weights))
        parts.append((weights[start:stop], slopes[start:stop - 1]))
        start = stop
    return parts


def bound_subchain(weights: list[np.ndarray], slopes: list, form: str, solver: str,
                   time_limit: float, norm: str = "2",
                   progress=None) -> tuple[float | None, dict[str, Any]]:
    """Certified l2 or linf bound of one chain (None if no certificate) and what was done.

    linf bounds each output row on its own (one SDP with input weights diag(tau) each) and
    takes the largest; the input is not compressed there (linf is not rotation invariant)."""
    t0 = time.perf_counter()
    if not all(np.all(np.isfinite(w)) for w in weights):  # the importer refuses these too
        return None, {"hidden_neurons": sum(w.shape[0] for w in weights[:-1]),
                      "build_s": 0.0, "solve_s": 0.0, "check_s": 0.0, "proposers": [],
                      "solver_status": {}, "certificate": "a weight is NaN or infinite: "
                                                          "no certificate"}
    if not slopes:  # a single affine map (the tail of a split chain)
        return affine_norm(weights[0], norm), {
            "hidden_neurons": 0, "build_s": 0.0, "solve_s": 0.0,
            "check_s": time.perf_counter() - t0, "proposers": ["exact"],
            "solver_status": {}, "certificate": "exact operator norm (affine)"}
    skip = has_output_connections(weights)
    # rescaling and compressing the input act on a chain's layers one by one; an output map
    # that also reads the input (a skip) would not follow them
    scaled, factor = (weights, 1.0) if skip else rescale(weights)
    n_hidden = sum(w.shape[0] for w in weights[:-1])
    t1 = time.perf_counter()
    if norm == "2":
        rows = [(scaled if skip else _compress(scaled), scaled)]
    else:
        rows = [(r, r) for r in ([*scaled[:-1], scaled[-1][j:j + 1]]
                                 for j in range(scaled[-1].shape[0]))]
    size = rows[0][0][0].shape[1] + n_hidden
    auto = solver == "auto" and form != "eclipse-fast"
    proposers = ["eclipse-fast"] if form == "eclipse-fast" else \
        auto_proposers(n_hidden, norm, slopes) if auto else [solver]
    info = {"hidden_neurons": n_hidden, "lmi_size": size, "build_s": t1 - t0, "solve_s": 0.0,
            "check_s": 0.0, "proposers": list(proposers), "solver_status": {},
            "certificate": "no proposal"}
    worst = 0.0
    deadline = t0 + time_limit
    for j, (solve_weights, check_weights) in enumerate(rows):
        if progress and len(rows) > 1:
            progress(f"solving output {j + 1} of {len(rows)}")
        remaining = max(1.0, (deadline - time.perf_counter()) / (len(rows) - j))
        value = _propose_and_certify(solve_weights, check_weights, slopes, form, proposers,
                                     auto, remaining, norm, info)
        if value is None:
            return None, info
        worst = max(worst, value)
    return math.nextafter(math.sqrt(worst), math.inf) * factor, info  # factor: a power of 2


def _propose_and_certify(solve_weights, check_weights, slopes, form: str,
                         proposers: list[str], auto: bool, time_limit: float, norm: str,
                         info: dict[str, Any]) -> float | None:
    """The smallest certified squared bound over the proposers' multipliers. In auto mode
    a proposal that could not be certified, or only after mixing in the feasible start,
    brings in the first-order proposer as well (l2), and a barrier run that gave no
    certificate brings in SCS. The first-order method starts from the
    best certified (possibly repaired) multipliers so far, or ECLipsE-Fast's where they
    apply, and only ever keeps improvements. Measured: ACAS Xu, SCS's repaired point
    certifies 5.1e6, first-order from it 1.2e5; 8-80x6-4 ReLU net, first-order from the
    generic feasible start 240 (naive 146), from ECLipsE-Fast's 24.6 it reaches 18.7."""
    best, best_lam = None, None
    queue = list(proposers)
    deadline = time.perf_counter() + time_limit  # shared by the proposers
    while queue:
        name = queue.pop(0)
        ts = time.perf_counter()
        limit = max(1.0, deadline - ts)
        if auto and name == "scs" and math.isfinite(time_limit):  # inf: iterations decide
            limit = min(limit, SCS_AUTO_SECONDS)
        if name == "eclipse-fast":  # closed form; its golden search is all checking
            candidate, why, lam = _eclipse_certificate(check_weights, slopes, deadline)
            status, tc = "closed form", ts
        else:
            start = best_lam if name == "firstorder" else None
            if name == "firstorder" and start is None and norm == "2" and \
                    eclipse_applies(slopes):  # a far better start than feasible_start
                start = _eclipse_certificate(check_weights, slopes, deadline)[2]
            lam, sinfo = solve_lipsdp(solve_weights, slopes, form, name, limit, norm, start)
            status, tc = sinfo["status"], time.perf_counter()
            candidate, why, lam = (None, "the solver returned no multipliers", None) \
                if lam is None else certify_and_repair(check_weights, slopes, lam,
                                                       sinfo.get("input_weights"))
        info["solve_s"] += tc - ts
        info["check_s"] += time.perf_counter() - tc
        key = name if name not in info["solver_status"] else \
            f"{name} #{len(info['solver_status'])}"
        info["solver_status"][key] = f"{status}; {why}"
        if candidate is not None and (best is None or candidate < best):
            best, best_lam = candidate, lam
            info["certificate"] = f"{why}, multipliers from {name}"
        elif best is None:
            info["certificate"] = why
        clean = candidate is not None and "mixing" not in why
        if auto and name == "barrier" and candidate is None and "scs" not in proposers:
            proposers.append("scs")  # a second opinion from the splitting solver
            info["proposers"].append("scs")
            queue.append("scs")
        if auto and norm == "2" and not clean and "firstorder" not in proposers:
            proposers.append("firstorder")
            info["proposers"].append("firstorder")
            queue.append("firstorder")
    return best


def affine_norm(matrix: np.ndarray, norm: str) -> float:
    """Exact operator norm of an affine map's matrix, rounded up."""
    from ..common.norms import max_row_abs_sum, spectral_norm

    return spectral_norm(matrix) if norm == "2" else max_row_abs_sum(matrix)

