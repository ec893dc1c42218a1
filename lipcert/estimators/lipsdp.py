"""The ``lipsdp`` estimator: LipSDP (Fazlyab, Robey, Hassani, Morari, Pappas, NeurIPS 2019)
for chains of dense layers and slope-restricted activations, l2 norm.

With z = [x_0; x_1; ...; x_{l-1}], A = [blkdiag(W_1..W_{l-1}), 0] (pre-activations) and
B = [0, I] (post-activations), LipSDP solves (their Theorem 2)
    min rho  s.t.  M = [A; B]^T [[-2 a b T, (a + b) T], [(a + b) T, -2T]] [A; B]
                       + blkdiag(-rho I, 0, ..., 0, W_l^T W_l)  <= 0,   T diagonal >= 0,
and L = sqrt(rho). Forms: ``neuron`` (one multiplier per neuron, default) and ``layer``
(one per layer). Biases cancel. The "LipSDP-Network" coupling is unsound and not offered.

The solver only proposes T. The printed bound comes from :mod:`sdp_certificate`: T clipped
to >= 0, rho* from the Schur complement on the *uncompressed* problem, a margin, and a
Cholesky proof of -M > 0 that accounts for float64 rounding. If that fails we try the other
form's multipliers, then give no bound and say why; the solver's objective is never printed.
The SDP itself is solved on the compressed input (W_1^T = QR, W_1 -> R^T: exact in real
arithmetic), which keeps it small when the input is wide.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ..errors import MethodNotApplicable
from ..ir import ops as O
from ..ir.graph import Graph
from .base import Bound, Estimator, register
from .chain import DenseChain, dense_chain
from .sdp_certificate import U, proves_positive_definite, smallest_rho

SLOPE_RESTRICTED = (O.Relu, O.LeakyRelu, O.Sigmoid, O.Tanh, O.Clip)
MAX_NEURONS = 64  # interior-point cost grows like (n0 + N)^6: see the note in README


def _structure(weights: list[np.ndarray]):
    """Row blocks of A: (row offset, column offset, W) for each hidden layer."""
    n0 = weights[0].shape[1]
    blocks, row, col = [], 0, 0
    for w in weights[:-1]:
        blocks.append((row, col, w))
        row += w.shape[0]
        col += w.shape[1]
    return n0, row, blocks


def assemble(weights: list[np.ndarray], slopes: list[tuple[float, float]], lam: np.ndarray,
             absolute: bool = False) -> np.ndarray:
    """P = sum_i lam_i F_i + blkdiag(0, .., W_l^T W_l), dense, in float64 (rho excluded).

    With ``absolute`` every term's absolute value is summed instead: an entrywise bound used
    for the rounding error of forming P.
    """
    n0, n_hidden, blocks = _structure(weights)
    d = n0 + n_hidden
    p = np.zeros((d, d))
    f = np.abs if absolute else (lambda x: x)
    offset = 0
    for k, (row, col, w) in enumerate(blocks):
        alpha, beta = slopes[k]
        lk = lam[row:row + w.shape[0]]
        cols = slice(col, col + w.shape[1])
        hid = slice(n0 + row, n0 + row + w.shape[0])
        wl = lk[:, None] * w  # T W
        p[cols, cols] += f(-2.0 * alpha * beta * (w.T @ wl)) if not absolute else \
            abs(2.0 * alpha * beta) * (np.abs(w).T @ np.abs(wl))
        cross = (alpha + beta) * wl  # (a + b) T W, block (hidden, cols)
        p[hid, cols] += f(cross)
        p[cols, hid] += f(cross.T)
        p[hid, hid] += np.diag(f(-2.0 * lk))
        offset += w.shape[0]
    wl_last = weights[-1]
    last = slice(d - wl_last.shape[1], d)
    p[last, last] += (np.abs(wl_last).T @ np.abs(wl_last)) if absolute else wl_last.T @ wl_last
    return p


def certify_multipliers(weights, slopes, lam) -> tuple[float | None, str]:
    """A float-rigorous rho for fixed multipliers, or (None, why)."""
    lam = np.maximum(np.asarray(lam, dtype=np.float64), 0.0)
    n0 = weights[0].shape[1]
    p = assemble(weights, slopes, lam)
    rho = smallest_rho(p[:n0, :n0], p[:n0, n0:], p[n0:, n0:])
    if rho is None:
        return None, "the multipliers do not make the hidden block negative definite"
    d = p.shape[0]
    scale = max(1.0, float(np.max(np.abs(np.diag(p)))))
    rho = max(rho, 0.0)
    abs_p = assemble(weights, slopes, lam, absolute=True)
    inner = max(w.shape[1] for w in weights) + 4
    formation = 4.0 * inner * U * float(np.linalg.norm(abs_p, "fro"))
    for bump in (1e-9, 1e-7, 1e-5, 1e-3):
        trial = math.nextafter(rho * (1 + bump) + bump * 1e-3 * scale, math.inf)
        m = p.copy()
        m[np.arange(n0), np.arange(n0)] -= trial
        if proves_positive_definite(-m, formation + U * trial * d):
            return trial, f"certified with margin {bump:g}"
    return None, "the Cholesky check of -M failed at every margin"


def _compress(weights: list[np.ndarray]) -> list[np.ndarray]:
    w1 = weights[0]
    if w1.shape[1] <= w1.shape[0]:
        return weights
    _, r = np.linalg.qr(w1.T)  # W_1^T = Q R, Q orthonormal columns
    return [r.T, *weights[1:]]


def lmi_blocks(weights, slopes, lam_expr, rho, cp):
    """The LMI matrix M as a cvxpy block matrix over (x_0, x_1, ..., x_{l-1}).

    Block (x_{k-1}, x_{k-1}) gets -2 a b W_k^T T_k W_k, block (x_k, x_{k-1}) gets
    (a + b) T_k W_k, block (x_k, x_k) gets -2 T_k, the last block W_l^T W_l, the first -rho I.
    ``lam_expr[k]`` is the vector of layer k's multipliers (a cvxpy expression).
    """
    sizes = [weights[0].shape[1]] + [w.shape[0] for w in weights[:-1]]
    nb = len(sizes)
    blocks: list[list[Any]] = [[None] * nb for _ in range(nb)]
    diag_terms: list[list[Any]] = [[] for _ in range(nb)]
    diag_terms[0].append(-rho * np.eye(sizes[0]))
    for k, w in enumerate(weights[:-1]):
        alpha, beta = slopes[k]
        lk = lam_expr[k]
        if alpha * beta != 0.0:
            # W^T diag(l) W = sum_i l_i w_i w_i^T as one matrix-vector product
            outer = np.einsum("ij,ik->jki", w, w).reshape(-1, w.shape[0])
            term = cp.reshape(outer @ lk, (w.shape[1], w.shape[1]), order="C")
            diag_terms[k].append(-2.0 * alpha * beta * term)
        cross = cp.multiply(cp.reshape(lk, (w.shape[0], 1), order="C") @ np.ones((1, w.shape[1])),
                            (alpha + beta) * w)
        blocks[k + 1][k] = cross
        blocks[k][k + 1] = cross.T
        diag_terms[k + 1].append(-2.0 * cp.diag(lk))
    diag_terms[-1].append(weights[-1].T @ weights[-1])
    for k in range(nb):
        blocks[k][k] = sum(diag_terms[k][1:], diag_terms[k][0])
        for j in range(nb):
            if blocks[k][j] is None:
                blocks[k][j] = np.zeros((sizes[k], sizes[j]))
    return cp.bmat(blocks)


def solve_lipsdp(weights, slopes, form: str, solver: str, time_limit: float):
    """Solve the SDP (cvxpy); returns per-neuron multipliers and solver info."""
    import cvxpy as cp

    sizes = [w.shape[0] for w in weights[:-1]]
    if form == "neuron":
        variables = [cp.Variable(n, nonneg=True) for n in sizes]
        lam_expr = variables
    else:
        variables = [cp.Variable(nonneg=True) for _ in sizes]
        lam_expr = [v * np.ones(n) for v, n in zip(variables, sizes, strict=True)]
    rho = cp.Variable()
    m = lmi_blocks(weights, slopes, lam_expr, rho, cp)
    problem = cp.Problem(cp.Minimize(rho), [(m + m.T) / 2 << 0])
    kwargs: dict[str, Any] = {}
    if solver.upper() == "CLARABEL":
        kwargs = {"time_limit": time_limit}
    elif solver.upper() == "SCS":
        kwargs = {"time_limit_secs": time_limit, "eps_abs": 1e-7, "eps_rel": 1e-7,
                  "max_iters": 200_000}
    start = time.perf_counter()
    try:
        problem.solve(solver=solver.upper(), **kwargs)
    except Exception as exc:  # solver failure: no multipliers
        return None, {"status": f"solver error: {exc}", "solve_s": time.perf_counter() - start}
    info = {"status": problem.status, "solve_s": time.perf_counter() - start}
    if any(v.value is None for v in variables):
        return None, info
    if form == "neuron":
        values = np.concatenate([np.asarray(v.value, dtype=np.float64).reshape(-1)
                                 for v in variables])
    else:
        values = np.concatenate([np.full(n, float(v.value)) for v, n in
                                 zip(variables, sizes, strict=True)])
    return values, info


def slopes_of(chain: DenseChain) -> list[tuple[float, float]]:
    return [O.slope_range(a) for a in chain.activations]


@register
class LipSDPEstimator(Estimator):
    name = "lipsdp"
    summary = ("LipSDP (Neuron/Layer forms) for chains with slope-restricted activations; "
               "the printed bound is a float-rigorously checked certificate")
    norms = ("2",)
    handlers = {O.Dense: None, O.Reshape: None, O.Scale: None,
                **{a: None for a in SLOPE_RESTRICTED}}

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:
        chain = dense_chain(graph, self.name, SLOPE_RESTRICTED)
        form = str(options.get("form", "neuron")).lower()
        if form not in ("neuron", "layer"):
            raise MethodNotApplicable(f"lipsdp form {form!r}: use neuron or layer")
        n_hidden = sum(chain.hidden_sizes)
        if n_hidden > int(options.get("max_neurons", MAX_NEURONS)):
            raise MethodNotApplicable(f"method lipsdp refuses {n_hidden} hidden neurons (limit "
                                      f"{options.get('max_neurons', MAX_NEURONS)})")
        slopes = slopes_of(chain)
        if not chain.activations:  # affine: exact
            from .layer_norms import spectral_norm

            return Bound(method=self.name, norm=norm, upper=spectral_norm(chain.weights[0]),
                         notes=["affine model: exact spectral norm"])
        solver = str(options.get("solver", "clarabel"))
        time_limit = float(options.get("time_limit", 60.0))
        t0 = time.perf_counter()
        compressed = _compress(chain.weights)
        t1 = time.perf_counter()
        lam, info = solve_lipsdp(compressed, slopes, form, solver, time_limit)
        t2 = time.perf_counter()
        notes = [f"LipSDP-{form.capitalize()} solved by {solver} ({info['status']})"]
        rho, how = (None, "the solver returned no multipliers") if lam is None else \
            certify_multipliers(chain.weights, slopes, lam)
        t3 = time.perf_counter()
        details = {"form": form, "solver": solver, "hidden_neurons": n_hidden,
                   "build_s": t1 - t0, "solve_s": t2 - t1, "check_s": t3 - t2,
                   "solver_status": info["status"], "certificate": how}
        if rho is None:
            notes.append(f"no certificate: {how}; no bound printed (the solver's objective "
                         "is not a bound)")
            return Bound(method=self.name, norm=norm, upper=None, notes=notes, details=details)
        notes.append(f"bound from a checked certificate ({how})")
        return Bound(method=self.name, norm=norm, upper=math.nextafter(math.sqrt(rho),
                                                                        math.inf),
                     notes=notes, details=details)
