"""Who proposes LipSDP multipliers: interior-point and splitting solvers through cvxpy, a
first-order method on rho*(T) (Wang et al., ICLR 2024), ECLipsE-Fast's closed form (Xu and
Sivaranjani, NeurIPS 2024), and the "auto" policy. A proposal proves nothing until
:mod: checks it."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any

import numpy as np

from ...errors import MethodNotApplicable
from ..common.interrupts import interruptible_scs
from ..common.progress import Countdown, report
from .banded import hidden_maximisers, largest_eigenvalue, schur_factors
from .certificate import certify_and_repair, estimate_rho
from .eigen import LANCZOS_FROM, top_eigenpairs
from .lmi import (
    GroupQC,
    feasible_start,
    lmi_blocks,
    lmi_components,
    lmi_expression,
    lmi_size,
    nonneg_mask,
    parameter_groups,
)

BARRIER_NEURONS = 600  # the barrier method in "auto" up to this many, first-order beyond
SCS_AUTO_SECONDS = 15.0
#: the ECLipsE-Fast scale search stops when its bracket on log c is this narrow (c known to
#: 0.01%; rho moves by at most about as much); about 25 evaluations from a bracket of 2
SCALE_WIDTH = 1e-4
SCALE_STEPS = 26  # for the progress line's estimate of the time left
#: eigenpairs the first-order proposer smooths over beyond LANCZOS_FROM input dimensions
TOP_PAIRS = 8


def _top_eigenpairs(a):
    """Eigenvalues (ascending) and eigenvectors of a symmetric torch matrix: all of them
    below :data:`.eigen.LANCZOS_FROM`, the :data:`TOP_PAIRS` largest beyond
    (:func:`.eigen.top_eigenpairs`)."""
    import torch

    if a.shape[0] < LANCZOS_FROM:
        return torch.linalg.eigh(a)
    vals, vecs = top_eigenpairs(a.numpy(), TOP_PAIRS, tol=1e-10)
    return torch.as_tensor(vals), torch.as_tensor(vecs)


def _quadratic_form(m, zs):
    """sum over columns of z^T M z for block-tridiagonal M (torch) and z by blocks."""
    import torch

    total = sum(torch.sum(z * (d @ z)) for d, z in zip(m.diag, zs, strict=True))
    return total + 2.0 * sum(torch.sum(zs[k + 1] * (b @ zs[k])) for k, b in enumerate(m.sub))


def propose_first_order(weights, slopes, form: str, iterations: int = 1000,
                        time_limit: float = 60.0, start: np.ndarray | None = None):
    """Minimise rho*(T) = lambda_max(P11 - P12 P22^{-1} P21) over T >= 0 (convex on its
    domain, since it is the optimal rho of the LMI for fixed T) by Adam on log T, with a
    smoothed max eigenvalue (log-sum-exp of the eigenvalues; beyond :data:`LANCZOS_FROM`
    input dimensions, of the :data:`TOP_PAIRS` largest). The Schur complement is computed
    by blocks (:func:`schur_factors`), so a step costs sum_k n_k^3, not (sum_k n_k)^3, and
    the gradient comes from the eigenvectors by the envelope theorem
    (:func:`hidden_maximisers`: d lambda_i = z_i^T dM z_i, with no derivative of a
    factorisation; cifar_wide_kw: 7 s a step where autograd through the sweep took 20 s).
    Any T it returns is only a proposal: the certificate decides."""
    import torch

    ws = [torch.as_tensor(w, dtype=torch.float64) for w in weights]
    if start is not None:  # it must keep the hidden block negative definite, else use ours
        start = np.where(nonneg_mask(weights, slopes), np.maximum(start, 0.0), start)
        if estimate_rho(weights, slopes, start) is None:
            start = None
    if start is None:
        start = feasible_start(weights, slopes)
    positive = nonneg_mask(weights, slopes)
    groups = parameter_groups(weights, slopes, form)
    index = [g[0] for g in groups]
    scatter = np.zeros(len(start), dtype=np.int64)
    for j, g in enumerate(groups):
        scatter[g] = j
    pos = torch.as_tensor(positive[index])
    init = np.where(positive[index], np.log(np.maximum(start[index], 1e-300)), start[index])
    u = torch.tensor(init, dtype=torch.float64, requires_grad=True)
    scatter_t = torch.as_tensor(scatter)

    def multipliers(v):
        return torch.where(pos, torch.exp(v), v)[scatter_t]

    opt = torch.optim.Adam([u], lr=0.2)
    best, best_u = np.inf, u.detach().clone()
    t0 = time.perf_counter()
    for it in range(iterations):
        with torch.no_grad():
            got = schur_factors(lmi_blocks(ws, slopes, multipliers(u), xp=torch), xp=torch)
            if got is None:  # left the domain: step back towards the last good point
                u.copy_((u + best_u) / 2)
                continue
            schur, factors = got
            eig, vecs = _top_eigenpairs(schur)
            value = float(eig[-1])
            if value < best:
                best, best_u = value, u.detach().clone()
            sharp = 50.0 * (1 + it / 50) / max(abs(value), 1e-300)
            weight = torch.softmax(sharp * eig, 0)  # the gradient of log-sum-exp
            zs = hidden_maximisers(factors, vecs * torch.sqrt(weight), xp=torch)
        loss = _quadratic_form(lmi_blocks(ws, slopes, multipliers(u), xp=torch), zs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 20 == 0:
            left = max(0.0, time_limit - (time.perf_counter() - t0))
            report(f"first-order step {it + 1}/{iterations} (<= {left:.0f} s left), "
                   f"best {math.sqrt(max(best, 0.0)):.4g}")
        if time.perf_counter() - t0 > time_limit:
            break
    with torch.no_grad():
        lam = multipliers(best_u).numpy()
    return lam, {"status": f"first-order ({it + 1} steps)",
                 "solve_s": time.perf_counter() - t0}


def solve_lipsdp(weights, slopes, form: str, solver: str, time_limit: float,
                 norm: str = "2", start: np.ndarray | None = None):
    """Solve the SDP; returns the multiplier vector and solver info.

    ``norm`` "inf" (for a single output row): minimise sum(tau) with diag(tau) in place of
    rho I, as in the linf LipSDP of Wang et al. (ICLR 2024) and Pauli et al. (ICLR 2024,
    Sec. 4.3); the input weights tau are returned in ``info["input_weights"]``."""
    if solver.lower() == "barrier":
        from .barrier import propose_barrier

        return propose_barrier(weights, slopes, form, norm, time_limit)
    if solver.lower() == "firstorder":
        if norm != "2":
            raise MethodNotApplicable("the first-order proposer is l2 only")
        return propose_first_order(weights, slopes, form, time_limit=time_limit, start=start)
    return _solve_cvxpy(weights, slopes, form, solver, time_limit, norm)


def _solve_cvxpy(weights, slopes, form: str, solver: str, time_limit: float, norm: str):
    """The SDP through cvxpy (Clarabel or SCS): multipliers and solver info."""
    import cvxpy as cp

    groups = parameter_groups(weights, slopes, form)
    positive = nonneg_mask(weights, slopes)
    v = cp.Variable(len(groups))
    rho = cp.Variable() if norm == "2" else cp.Variable(weights[0].shape[1], nonneg=True)
    m = lmi_expression(weights, slopes, v, groups, rho, cp)
    sym = (m + m.T) / 2
    constraints = [sym[a:b, a:b] << 0 for a, b in lmi_components(weights, slopes)]
    signed = [j for j, g in enumerate(groups) if positive[g[0]]]
    if signed:
        constraints.append(v[signed] >= 0)
    problem = cp.Problem(cp.Minimize(rho if norm == "2" else cp.sum(rho)), constraints)
    kwargs: dict[str, Any] = {}
    if solver.upper() == "CLARABEL":
        kwargs = {"time_limit": time_limit}
    elif solver.upper() == "SCS":
        kwargs = {"eps_abs": 1e-5, "eps_rel": 1e-5, "max_iters": 200_000}
        if math.isfinite(time_limit):  # SCS takes no infinite limit: max_iters decides
            kwargs["time_limit_secs"] = time_limit
    start = time.perf_counter()
    size = lmi_size(weights)
    report(f"{solver.upper()} on the LMI (size {size}"
           + (f", <= {time_limit:.0f} s)" if math.isfinite(time_limit) else ")"))
    try:
        with warnings.catch_warnings(), interruptible_scs():
            warnings.simplefilter("ignore")  # "may be inaccurate": the certificate decides
            problem.solve(solver=solver.upper(), **kwargs)
    except Exception as exc:  # solver failure: no multipliers
        return None, {"status": f"solver error: {exc}", "solve_s": time.perf_counter() - start}
    info = {"status": problem.status, "solve_s": time.perf_counter() - start}
    if v.value is None:
        return None, info
    values = np.zeros(len(positive))
    for j, idx in enumerate(groups):
        values[idx] = float(v.value[j])
    if norm != "2":
        if rho.value is None:
            return None, info
        info["input_weights"] = np.maximum(np.asarray(rho.value, dtype=np.float64), 0.0)
    return values, info


def auto_proposers(n_hidden: int, norm: str, slopes: list) -> list[str]:
    """Who proposes multipliers in ``solver=auto`` (measured, bench/results/lipsdp.txt):
    the barrier method up to :data:`BARRIER_NEURONS` hidden neurons (8-256x2-4 ReLU:
    41 s to a gap of 3e-9 where SCS took 124 s to "optimal_inaccurate"; the LipSDP
    authors' MNIST 784-50-10: 0.44 s against SCS's 4.5 s); beyond (l2), ECLipsE-Fast's
    certified multipliers, then the first-order method started from them; linf beyond:
    SCS (one SDP per output row shares the time limit, and a Newton step there costs
    d m^2)."""
    if n_hidden <= BARRIER_NEURONS:
        return ["barrier"]
    if norm != "2":
        return ["scs"]
    return ["eclipse-fast", "firstorder"] if eclipse_applies(slopes) else ["firstorder"]


def eclipse_applies(slopes) -> bool:
    """ECLipsE-Fast's closed form needs slope ranges [0, beta] (no GroupSort)."""
    return all(not isinstance(q, GroupQC) and q[0] == 0.0 for q in slopes)


def eclipse_fast_multipliers(weights, slopes) -> np.ndarray:
    """ECLipsE-Fast (Xu and Sivaranjani, NeurIPS 2024, Alg. 2) for slopes [0, beta]:
    X_0 = I, l_i = 1 / (2 m^2 lambda_max(W_i X_{i-1}^{-1} W_i^T)), m = beta / 2,
    X_i = l_i I - l_i^2 m^2 W_i X_{i-1}^{-1} W_i^T. Returns the layer multipliers l_i
    (repeated per neuron); the bound itself comes from the certificate check."""
    x_prev = np.eye(weights[0].shape[1])
    lam = []
    for k, (w, qc) in enumerate(zip(weights[:-1], slopes, strict=True)):
        report(f"ECLipsE-Fast multipliers, layer {k + 1}/{len(slopes)}")
        if isinstance(qc, GroupQC) or qc[0] != 0.0:
            raise MethodNotApplicable("lipsdp form eclipse-fast needs slope ranges [0, beta] "
                                      "(ReLU, Sigmoid, Tanh, Clip, Elu, Softplus)")
        m = qc[1] / 2.0
        k = w @ _solve_positive(x_prev, w.T)
        k = (k + k.T) / 2
        li = 1.0 / (2.0 * m * m * largest_eigenvalue(k, lanczos=True))
        x_prev = li * np.eye(w.shape[0]) - li * li * m * m * k
        lam.append(np.full(w.shape[0], li))
    return np.concatenate(lam)


def _solve_positive(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    """X^-1 B for X symmetric positive definite (Cholesky; LU when that fails)."""
    import scipy.linalg as sla

    try:
        return sla.cho_solve(sla.cho_factor(x, lower=True), b)
    except (np.linalg.LinAlgError, sla.LinAlgError, ValueError):
        return np.linalg.solve(x, b)


def bracket_minimum(f, start: float = 0.0, step: float = 1.0,
                    limits: tuple[float, float] = (-30.0, 30.0)):
    """(a, b, c, f(a), f(b), f(c)) with a < b < c and f(b) <= min(f(a), f(c)) for a unimodal
    f that may be +inf on one side: steps out from ``start`` by doubling (Press et al.,
    Numerical Recipes, 3rd ed., Sec. 10.1, without the parabolic step, which inf values
    break). Stops at ``limits``, the bracket then holding the best point seen."""
    lo, hi = limits
    b, fb = start, f(start)
    a, fa = max(lo, start - step), f(max(lo, start - step))
    c, fc = min(hi, start + step), f(min(hi, start + step))
    while not (fb < math.inf and fb <= fa and fb <= fc):  # f maps NaN to inf
        if fb == math.inf and fa == math.inf and fc == math.inf:
            if c >= hi:  # infeasible everywhere it looked
                return a, b, c, fa, fb, fc
            step *= 2.0  # small scales are the infeasible ones: look above
            a, fa, b, fb = b, fb, c, fc
            c = min(hi, b + step)
            fc = f(c)
        elif fa < fb or (fa == fb and fa < fc):  # downhill to the left
            if a <= lo:
                return a, a, b, fa, fa, fb
            step *= 2.0
            c, fc, b, fb = b, fb, a, fa
            a = max(lo, b - step)
            fa = f(a)
        else:  # downhill to the right
            if c >= hi:
                return b, c, c, fb, fc, fc
            step *= 2.0
            a, fa, b, fb = b, fb, c, fc
            c = min(hi, b + step)
            fc = f(c)
    return a, b, c, fa, fb, fc


def golden_evaluations(a: float, c: float, width: float) -> int:
    """How many calls :func:`golden_minimum` makes on [a, c] (2, then one per shrink)."""
    shrinks = 0 if not c - a > width else math.ceil(math.log((c - a) / width) /
                                                    -math.log((math.sqrt(5) - 1) / 2))
    return 2 + shrinks


def golden_minimum(f, a: float, c: float, width: float, stop=lambda: False) -> None:
    """Golden-section search of a unimodal f on [a, c] down to a bracket of ``width``
    (f is called for its side effect of recording the best point; ``stop()`` ends early)."""
    golden = (math.sqrt(5) - 1) / 2
    x1, x2 = c - golden * (c - a), a + golden * (c - a)
    f1, f2 = f(x1), f(x2)
    while c - a > width and not stop():
        if f1 <= f2 and f1 < math.inf:
            c, x2, f2 = x2, x1, f1
            x1 = c - golden * (c - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + golden * (c - a)
            f2 = f(x2)


def _eclipse_certificate(weights, slopes, deadline: float = math.inf):
    """Certify the ECLipsE-Fast direction T at its best scale: rho*(c T) is convex in c
    (the LMI is jointly convex in rho and T), hence unimodal in log c, so the minimum is
    bracketed from c = 1 (ECLipsE-Fast's own scale) outwards and then found by golden
    sections on log c to :data:`SCALE_WIDTH`, on the unchecked :func:`estimate_rho`
    (small scales leave the hidden block indefinite: +inf); the multipliers there are then
    checked. Past ``deadline`` (perf_counter) the search stops at the best scale seen once
    one is feasible. Returns (rho, why, multipliers) with rho None when no scale was
    certified."""
    direction = eclipse_fast_multipliers(weights, slopes)
    size = lmi_size(weights)
    steps = Countdown(f"ECLipsE-Fast scale search (size {size})", SCALE_STEPS)
    best = [math.inf, 0.0]

    def value(log_c: float) -> float:
        if best[0] < math.inf and time.perf_counter() > deadline:
            return math.inf  # out of time: the best point seen stands
        rho = estimate_rho(weights, slopes, math.exp(log_c) * direction)
        rho = math.inf if rho is None or not math.isfinite(rho) else rho
        if rho < best[0]:
            best[:] = [rho, log_c]
        steps.step("" if best[0] == math.inf else f"best {math.sqrt(max(best[0], 0)):.4g}")
        return rho

    a, _, c, *_ = bracket_minimum(value)
    steps.total = steps.done + golden_evaluations(a, c, SCALE_WIDTH)
    golden_minimum(value, a, c, SCALE_WIDTH,
                   stop=lambda: best[0] < math.inf and time.perf_counter() > deadline)
    if best[0] == math.inf:
        return None, "no scale of the ECLipsE-Fast multipliers is feasible", None
    return certify_and_repair(weights, slopes, math.exp(best[1]) * direction)
