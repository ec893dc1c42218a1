"""The ``exact`` estimator: LipMIP (Jordan and Dimakis, NeurIPS 2020) for small ReLU chains.

Over an input box X, the linf -> linf Lipschitz constant is
    max_{x in X} max_i ||grad f_i(x)||_1,
with grad f_i = W_1^T D_1 W_2^T ... D_{K-1} W_K^T e_i and D_k = diag(a_k), a_k the ReLU
activation pattern at x. We encode, per output i, one mixed-integer program:
- forward ReLUs with big-M constraints from interval bounds on the box (a binary a per
  unstable neuron; stable neurons are fixed);
- backward products p = a * v linearised exactly with interval bounds on v (McCormick is
  exact for a binary a);
- the l1 norm of the input gradient with one binary sign per input coordinate.
solved with scipy's HiGHS ``milp``. The maximum over the binary patterns covers the extreme
points of Clarke's generalised Jacobian, so it is the exact (local, on X) constant.

HiGHS works to tolerances: the value is a reference (solver dual bound), not a
float-rigorous certificate. Refuses networks above a size limit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MethodNotApplicable
from ..ir import ops as O
from ..ir.chain import dense_chain
from ..ir.graph import Graph
from ..ir.lowering import CHAIN_LINEAR_OPS
from ..soundness import checked, poison
from .base import Bound, Estimator, register
from .common.region import box_from_options, nudged
from .settings import setting

MAX_RELUS = 200
MAX_INPUTS = 400
#: HiGHS needs seconds for 20 unstable ReLUs on a 2-core machine and finds no solution at
#: all within a minute for about 60 (``python bench/exact_scale.py``): refuse beyond this
MAX_UNSTABLE = 40


def relu_chain(graph: Graph) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) of each affine layer of a Dense/Relu chain (layout ops and Scales allowed)."""
    chain = dense_chain(graph, "exact", (O.Relu,))
    return list(zip(chain.weights, chain.biases, strict=True))


def interval_bounds(layers, low: np.ndarray, high: np.ndarray):
    """Pre-activation bounds of every hidden layer (interval arithmetic)."""
    bounds = []
    lo, hi = low, high
    for w, b in layers[:-1]:
        wp, wn = np.maximum(w, 0), np.minimum(w, 0)
        zl, zu = wp @ lo + wn @ hi + b, wp @ hi + wn @ lo + b
        bounds.append((zl, zu))
        lo, hi = np.maximum(zl, 0), np.maximum(zu, 0)
    return bounds


class _Program:
    """A growing MILP in scipy's matrix form: maximise c^T v."""

    def __init__(self):
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.integer: list[int] = []
        self.rows: list[tuple[dict[int, float], float, float]] = []
        self.objective: dict[int, float] = {}

    def var(self, lo: float, hi: float, integer: bool = False) -> int:
        self.lb.append(lo)
        self.ub.append(hi)
        self.integer.append(1 if integer else 0)
        return len(self.lb) - 1

    def row(self, coeffs: dict[int, float], lo: float = -np.inf, hi: float = np.inf) -> None:
        self.rows.append((coeffs, lo, hi))

    def solve(self, time_limit: float):
        from scipy.optimize import Bounds, LinearConstraint, milp  # only when exact runs
        from scipy.sparse import lil_matrix

        n = len(self.lb)
        a = lil_matrix((len(self.rows), n))
        lo, hi = [], []
        for r, (coeffs, rl, rh) in enumerate(self.rows):
            for j, v in coeffs.items():
                a[r, j] += v
            lo.append(rl)
            hi.append(rh)
        c = np.zeros(n)
        for j, v in self.objective.items():
            c[j] -= v  # milp minimises
        constraints = [LinearConstraint(a.tocsr(), lo, hi)] if self.rows else []
        return milp(c, constraints=constraints, integrality=np.array(self.integer),
                    bounds=Bounds(self.lb, self.ub),
                    options={"time_limit": time_limit, "mip_rel_gap": 1e-9, "disp": False})


def _row_coeffs(w_row: np.ndarray, inputs: list[int | None]) -> dict[int, float]:
    """w_row . inputs as {variable: coefficient}; inputs fixed at zero (None) drop out."""
    return {j: float(v) for j, v in zip(inputs, w_row, strict=True) if j is not None and v != 0}


def _forward_relus(prog: _Program, layers, pre, x: list[int]) -> list[list[tuple]]:
    """ReLU layers with big-M constraints from the interval bounds ``pre``; per hidden layer
    the pattern [(kind, binary var)], kind in {"on", "off", "bin"}."""
    prev: list[int | None] = list(x)
    patterns = []
    for (w, b), (zl, zu) in zip(layers[:-1], pre, strict=True):
        h, pattern = [], []
        for k in range(w.shape[0]):
            coeffs = _row_coeffs(w[k], prev)
            if zu[k] <= 0:
                h.append(None)
                pattern.append(("off", None))
                continue
            hv = prog.var(0.0, float(max(zu[k], 0.0)))
            if zl[k] >= 0:
                row = {**{j: -v for j, v in coeffs.items()}, hv: 1.0}
                prog.row(row, float(b[k]), float(b[k]))  # h = z
                pattern.append(("on", None))
            else:
                a = prog.var(0.0, 1.0, integer=True)
                neg = {j: -v for j, v in coeffs.items()}
                prog.row({**neg, hv: 1.0}, float(b[k]), np.inf)  # h >= z
                prog.row({hv: 1.0, a: -float(zu[k])}, -np.inf, 0.0)  # h <= u a
                prog.row({**neg, hv: 1.0, a: -float(zl[k])}, -np.inf,
                         float(b[k]) - float(zl[k]))  # h <= z - l (1 - a)
                pattern.append(("bin", a))
            h.append(hv)
        patterns.append(pattern)
        prev = h  # neurons fixed off (None) contribute nothing downstream
    return patterns


def _products(prog: _Program, pattern, v_vars, v_const, v_lo, v_hi) -> list[tuple[dict, float]]:
    """p_k = a_k v_k as affine expressions (McCormick, exact for a binary a_k)."""
    p_terms: list[tuple[dict, float]] = []
    for k, (kind, a) in enumerate(pattern):
        if kind == "off":
            p_terms.append(({}, 0.0))
        elif v_vars is None:
            p_terms.append(({}, float(v_const[k])) if kind == "on" else
                           ({a: float(v_const[k])}, 0.0))
        elif kind == "on":
            p_terms.append(({v_vars[k]: 1.0}, 0.0))
        else:
            lo, hi = float(v_lo[k]), float(v_hi[k])
            p = prog.var(min(lo, 0.0), max(hi, 0.0))
            vk = v_vars[k]
            prog.row({p: 1.0, a: -hi}, -np.inf, 0.0)
            prog.row({p: 1.0, a: -lo}, 0.0, np.inf)
            prog.row({p: 1.0, vk: -1.0, a: -lo}, -np.inf, -lo)
            prog.row({p: 1.0, vk: -1.0, a: -hi}, -hi, np.inf)
            p_terms.append(({p: 1.0}, 0.0))
    return p_terms


def _transpose_step(w: np.ndarray, pattern, p_terms, v_lo, v_hi):
    """v_prev = W^T p as affine expressions, with interval bounds."""
    kinds = [kind for kind, _ in pattern]

    def bounds(v, pick):  # p = a v with a in {0, 1} for "bin", 1 for "on", 0 for "off"
        return np.array([pick(0.0, float(v[k])) if kind == "bin" else
                         (0.0 if kind == "off" else float(v[k])) for k, kind in enumerate(kinds)])

    p_lo, p_hi = bounds(v_lo, min), bounds(v_hi, max)
    wt = w.T
    new_lo = np.maximum(wt, 0) @ p_lo + np.minimum(wt, 0) @ p_hi
    new_hi = np.maximum(wt, 0) @ p_hi + np.minimum(wt, 0) @ p_lo
    exprs = []
    for j in range(wt.shape[0]):
        coeffs: dict[int, float] = {}
        const = 0.0
        for k in np.flatnonzero(wt[j]):
            pc, pk = p_terms[k]
            for var, val in pc.items():
                coeffs[var] = coeffs.get(var, 0.0) + float(wt[j, k]) * val
            const += float(wt[j, k]) * pk
        exprs.append((coeffs, const))
    return exprs, new_lo, new_hi


def _l1_objective(prog: _Program, grad_vars, v_lo, v_hi) -> None:
    """Maximise sum_j |g_j|: t_j <= |g_j| with one sign binary where g_j changes sign."""
    for j, (coeffs, const) in enumerate(grad_vars):
        lo, hi = float(v_lo[j]), float(v_hi[j])
        big = max(abs(lo), abs(hi))
        if big == 0.0:
            continue
        t = prog.var(0.0, big)
        neg = {c: -v for c, v in coeffs.items()}
        if lo >= 0:
            prog.row({**neg, t: 1.0}, -np.inf, const)  # t <= g
        elif hi <= 0:
            prog.row({**coeffs, t: 1.0}, -np.inf, -const)  # t <= -g
        else:
            s = prog.var(0.0, 1.0, integer=True)
            prog.row({**neg, t: 1.0, s: 2 * big}, -np.inf, const + 2 * big)
            prog.row({**coeffs, t: 1.0, s: -2 * big}, -np.inf, -const)
        prog.objective[t] = 1.0


def _solve(prog: _Program, time_limit: float, n_in: int
           ) -> tuple[float, float, str, np.ndarray | None]:
    res = prog.solve(time_limit)
    dual = getattr(res, "mip_dual_bound", None)
    if res.x is None:
        if dual is not None and np.isfinite(dual):
            return -float(dual), 0.0, f"no incumbent: {res.message}", None
        raise MethodNotApplicable(
            f"method exact: HiGHS found neither a solution nor a bound within "
            f"{time_limit:.3g} s ({res.message}); raise -o time_limit or shrink the box")
    incumbent = -float(res.fun)
    dual = -float(dual) if dual is not None and np.isfinite(dual) else incumbent
    status = "optimal" if res.status == 0 else res.message
    return max(dual, incumbent), incumbent, status, np.asarray(res.x[:n_in], dtype=np.float64)


def attained_l1(layers, x: np.ndarray, output: int) -> float:
    """||grad f_output(x)||_1 at a point where no pre-activation is exactly 0 (else 0: at a
    kink the one-sided product need not be a gradient any nearby point has)."""
    v, masks = x, []
    for w, b in layers[:-1]:
        z = w @ v + b
        if np.any(z == 0):
            return 0.0
        masks.append(z > 0)
        v = np.maximum(z, 0)
    g = layers[-1][0][output].astype(np.float64)
    for (w, _), mask in zip(reversed(layers[:-1]), reversed(masks), strict=True):
        g = (g * mask) @ w
    value = float(np.abs(g).sum())
    return value if np.isfinite(value) else 0.0


def lipmip_output(layers, low, high, output: int, time_limit: float
                  ) -> tuple[float, float, str, np.ndarray | None]:
    """(dual bound, incumbent value, status, incumbent x) of max_x ||grad f_output(x)||_1 on
    the box."""
    if len(layers) == 1:  # no hidden layer: an affine map
        value = float(np.abs(layers[0][0][output]).sum())
        return value, value, "affine", (low + high) / 2
    prog = _Program()
    x = [prog.var(float(lo), float(hi)) for lo, hi in zip(low, high, strict=True)]
    patterns = _forward_relus(prog, layers, interval_bounds(layers, low, high), x)
    # backward pass: v = gradient w.r.t. the current hidden layer's output (constant at start)
    v_const = layers[-1][0][output].astype(np.float64)
    v_vars: list[int] | None = None
    v_lo = v_hi = v_const
    for depth in range(len(layers) - 2, -1, -1):
        p_terms = _products(prog, patterns[depth], v_vars, v_const, v_lo, v_hi)
        exprs, v_lo, v_hi = _transpose_step(layers[depth][0], patterns[depth], p_terms,
                                            v_lo, v_hi)
        if depth == 0:
            break
        v_vars = []
        for j, (coeffs, const) in enumerate(exprs):
            var = prog.var(float(v_lo[j]), float(v_hi[j]))
            prog.row({**{c: -v for c, v in coeffs.items()}, var: 1.0}, const, const)
            v_vars.append(var)
    _l1_objective(prog, exprs, v_lo, v_hi)
    if not prog.objective:
        return 0.0, 0.0, "zero", None
    return _solve(prog, time_limit, len(low))


def _refuse_hard_boxes(layers, low: np.ndarray, high: np.ndarray, region: dict,
                       limit: int) -> None:
    """Refuse before solving when the MIP has more binaries than HiGHS can search in time."""
    unstable = sum(int(np.count_nonzero((zl < 0) & (zu > 0)))
                   for zl, zu in interval_bounds(layers, low, high))
    if unstable > limit:
        raise MethodNotApplicable(
            f"method exact: {unstable} ReLUs are unstable on the box {region['describe']} "
            f"(limit max_unstable={limit}); the MIP would not finish. Use local (it branches "
            "on the same ReLUs and stops early with a valid bound), a smaller box "
            "(--input/--eps, --domain), or -o max_unstable=N at your own time's risk")


@dataclass(frozen=True)
class ExactSettings:
    time_limit: float = setting(60.0, "HiGHS time limit (seconds) for all outputs together "
                                      "(inf: none)", minimum=0, exclusive=True, infinite=True)
    max_relus: int = setting(MAX_RELUS, "refuse larger networks", minimum=1)
    max_inputs: int = setting(MAX_INPUTS, "refuse more inputs", minimum=1)
    max_unstable: int = setting(MAX_UNSTABLE, "refuse boxes with more ReLUs whose sign the "
                                              "box does not fix (each is a binary of the MIP)",
                                minimum=0)


@register
class ExactEstimator(Estimator):
    name = "exact"
    settings = ExactSettings
    deadline = ("time_limit", 0.7)
    summary = ("LipMIP: exact linf Lipschitz constant of small ReLU chains on a box, by a "
               "mixed-integer program (scipy HiGHS); a reference, not a certificate")
    norms = ("inf",)
    scope = "box"
    certificate = False
    handlers = {O.Relu: None, **{op: None for op in CHAIN_LINEAR_OPS}}

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:
        layers = relu_chain(graph)
        n_in = layers[0][0].shape[1]
        n_relu = sum(w.shape[0] for w, _ in layers[:-1])
        limit_relu = int(options.get("max_relus", MAX_RELUS))
        if n_relu > limit_relu or n_in > int(options.get("max_inputs", MAX_INPUTS)):
            raise MethodNotApplicable(
                f"method exact refuses networks above {limit_relu} ReLUs or "
                f"{options.get('max_inputs', MAX_INPUTS)} inputs (this one: {n_relu} ReLUs, "
                f"{n_in} inputs); raise -o max_relus=N at your own time's risk")
        low, high, region = box_from_options(options, n_in)
        _refuse_hard_boxes(layers, low, high, region,
                           int(options.get("max_unstable", MAX_UNSTABLE)))
        time_limit = float(options.get("time_limit", 60.0))
        start = time.perf_counter()
        best_dual, best_inc, statuses = 0.0, 0.0, []
        duals: list[float] = []
        rng = np.random.default_rng(0)
        n_out = layers[-1][0].shape[0]
        for i in range(n_out):  # an equal share of what is left for each remaining output
            remaining = max(1.0, (time_limit - (time.perf_counter() - start)) / (n_out - i))
            dual, _, status, point = lipmip_output(layers, low, high, i, remaining)
            dual = checked(poison("exact.value", dual), f"the MIP value of output {i}")
            # the lower value is what the incumbent attains, checked at a point moved off
            # kinks (a pattern feasible only on a kink is not attained)
            inc = 0.0 if point is None else attained_l1(
                layers, nudged(point, low, high, rng), i)
            best_dual, best_inc = max(best_dual, dual), max(best_inc, inc)
            statuses.append(status)
            duals.append(dual)
        solved = all(s in ("optimal", "affine", "zero") for s in statuses)
        notes = [f"exact linf constant on the box {region['describe']} (HiGHS, tolerance "
                 "1e-9 relative gap): a reference value, not a float-rigorous certificate"]
        if not solved:
            notes.append("HiGHS stopped before optimality on some outputs: value is its dual "
                         "bound")
        if not best_inc >= best_dual * (1 - 1e-6):  # NaN-safe: a gap is stated
            notes.append(f"the best activation pattern's gradient is attained only up to "
                         f"{best_inc:.6g} near the MIP's point (a pattern that holds only on a "
                         "kink is not attained): the true constant lies between the two")
        return Bound(method=self.name, norm=norm, upper=best_dual, lower=best_inc,
                     sound=False, scope="box", region=region, notes=notes,
                     details={"relus": n_relu, "status": statuses, "per_output": duals})

