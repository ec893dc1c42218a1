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
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import MethodNotApplicable
from ..ir import ops as O
from ..ir.graph import Graph
from ..soundness import checked, poison
from .affine_dag import CHAIN_LINEAR_OPS
from .base import Bound, Estimator, register
from .chain import DenseChain, dense_chain
from .rounding import mul_up, sum_up
from .sdp_certificate import U, proves_positive_definite, smallest_rho
from .settings import setting

SLOPE_RESTRICTED = (O.Relu, O.LeakyRelu, O.Sigmoid, O.Tanh, O.Clip)
MAX_NEURONS = 1024
SOLVERS = ("auto", "clarabel", "scs", "firstorder")
SCS_NEURONS = 320  # SCS in "auto" up to this many hidden neurons, first-order beyond
SCS_AUTO_SECONDS = 15.0


@dataclass(frozen=True)
class GroupQC:
    """GroupSort/MaxMin layer: ``groups`` (n_groups, g) are positions within the layer.

    Pauli, Havens, Araujo, Garg, Khorrami, Allgower, Hu (ICLR 2024), Sec. 4: each group is
    1-Lipschitz and preserves its sum, so for any lambda_j >= 0 and any real gamma_j
        dv^T T dv - dw^T T dw >= 0,   T = blkdiag_j(lambda_j I + gamma_j 1 1^T),
    for the increments dv of the group's input and dw of its output."""

    groups: np.ndarray


def _structure(weights: list[np.ndarray]):
    """Row blocks of A: (row offset, column offset, W) for each hidden layer."""
    n0 = weights[0].shape[1]
    blocks, row, col = [], 0, 0
    for w in weights[:-1]:
        blocks.append((row, col, w))
        row += w.shape[0]
        col += w.shape[1]
    return n0, row, blocks


def n_multipliers(weights, qcs) -> list[int]:
    """Entries of the multiplier vector per hidden layer: one per neuron for a slope
    restriction, (lambda_j, gamma_j) per group for GroupSort."""
    return [2 * q.groups.shape[0] if isinstance(q, GroupQC) else w.shape[0]
            for w, q in zip(weights[:-1], qcs, strict=True)]


def nonneg_mask(weights, qcs) -> np.ndarray:
    """True where a multiplier must be >= 0 (all but the GroupSort gamma_j)."""
    parts = []
    for w, q in zip(weights[:-1], qcs, strict=True):
        if isinstance(q, GroupQC):
            n = q.groups.shape[0]
            parts.append(np.r_[np.ones(n, bool), np.zeros(n, bool)])
        else:
            parts.append(np.ones(w.shape[0], bool))
    return np.concatenate(parts) if parts else np.zeros(0, bool)


def parameter_groups(weights, qcs, form: str) -> list[np.ndarray]:
    """Index sets of the multiplier vector that share one SDP variable in each form."""
    groups, offset = [], 0
    for n, q in zip(n_multipliers(weights, qcs), qcs, strict=True):
        idx = np.arange(offset, offset + n)
        offset += n
        if form == "neuron":
            groups += [idx[i:i + 1] for i in range(n)]
        elif isinstance(q, GroupQC):
            groups += [idx[: n // 2], idx[n // 2:]]
        else:
            groups.append(idx)
    return groups


def _membership(groups: np.ndarray, size: int) -> np.ndarray:
    g = np.zeros((size, groups.shape[0]))
    for j, row in enumerate(groups):
        g[row, j] = 1.0
    return g


def assemble(weights, slopes, lam, absolute: bool = False, xp=np):
    """P = sum_i lam_i F_i + blkdiag(0, .., W_l^T W_l), dense (rho excluded).

    ``slopes`` gives each hidden layer's quadratic constraint: (alpha, beta) for a slope
    restriction, or a :class:`GroupQC`. ``xp`` is numpy (float64 arrays) or torch (float64
    tensors, differentiable in ``lam``). With ``absolute`` (numpy only) every term's
    absolute value is summed instead: an entrywise bound used for the rounding error of
    forming P.
    """
    n0, n_hidden, blocks = _structure(weights)
    d = n0 + n_hidden
    p = xp.zeros((d, d), dtype=xp.float64)
    offset = 0
    for k, (row, col, w) in enumerate(blocks):
        qc = slopes[k]
        cols = slice(col, col + w.shape[1])
        hid = slice(n0 + row, n0 + row + w.shape[0])
        if isinstance(qc, GroupQC):
            n_groups = qc.groups.shape[0]
            lk, gk = lam[offset:offset + n_groups], lam[offset + n_groups:offset + 2 * n_groups]
            offset += 2 * n_groups
            memb = _membership(qc.groups, w.shape[0])
            if xp is not np:
                memb = xp.as_tensor(memb, dtype=xp.float64)
            if absolute:
                t = np.diag(memb @ np.abs(lk)) + memb @ (np.abs(gk)[:, None] * memb.T)
                p[cols, cols] += np.abs(w).T @ t @ np.abs(w)
                p[hid, hid] += t
            else:
                t = xp.diag(memb @ lk) + memb @ (gk[:, None] * memb.T)
                p[cols, cols] += w.T @ t @ w
                p[hid, hid] += -t
            continue
        alpha, beta = qc
        lk = lam[offset:offset + w.shape[0]]
        offset += w.shape[0]
        wl = lk[:, None] * w  # T W
        if absolute:
            p[cols, cols] += abs(2.0 * alpha * beta) * (np.abs(w).T @ np.abs(wl))
            p[hid, cols] += np.abs((alpha + beta) * wl)
            p[cols, hid] += np.abs((alpha + beta) * wl).T
            p[hid, hid] += np.diag(np.abs(2.0 * lk))
        else:
            p[cols, cols] += -2.0 * alpha * beta * (w.T @ wl)
            p[hid, cols] += (alpha + beta) * wl  # (a + b) T W, block (hidden, cols)
            p[cols, hid] += (alpha + beta) * wl.T
            p[hid, hid] += xp.diag(-2.0 * lk)
    w_last = weights[-1]
    last = slice(d - w_last.shape[1], d)
    p[last, last] += (np.abs(w_last).T @ np.abs(w_last)) if absolute else w_last.T @ w_last
    return p


def _equivalent_slopes(qc) -> tuple[float, float]:
    """With gamma = 0 the GroupSort constraint is the slope constraint [-1, 1] (times 2)."""
    return (-1.0, 1.0) if isinstance(qc, GroupQC) else qc


def feasible_start(weights, slopes) -> np.ndarray:
    """Per-layer multipliers that make the hidden block negative definite by block diagonal
    dominance: t_{l-1} = 2 ||W_l||^2, t_k = 2 max(a^2, b^2)... ||W_{k+1}||^2 t_{k+1} (+ the
    a b W^T T W term), so every hidden 2x2 block [[-t_k, c t_{k+1} W], ...] is < 0."""
    sizes = [w.shape[0] for w in weights[:-1]]
    t = [0.0] * len(sizes)
    t[-1] = 2.0 * np.linalg.norm(weights[-1], 2) ** 2 + 1e-12
    for k in range(len(sizes) - 2, -1, -1):
        alpha, beta = _equivalent_slopes(slopes[k + 1])
        nw = np.linalg.norm(weights[k + 1], 2) ** 2
        t[k] = 4.0 * ((alpha + beta) ** 2 / 4.0 + abs(alpha * beta) + 1.0) * nw * t[k + 1] \
            + 1e-12
    parts = []
    for tk, w, qc in zip(t, weights[:-1], slopes, strict=True):
        if isinstance(qc, GroupQC):
            n = qc.groups.shape[0]
            parts.append(np.r_[np.full(n, 2.0 * tk), np.zeros(n)])
        else:
            parts.append(np.full(w.shape[0], tk))
    return np.concatenate(parts)


def propose_first_order(weights, slopes, form: str, iterations: int = 1000,
                        time_limit: float = 60.0, start: np.ndarray | None = None):
    """Minimise rho*(T) = lambda_max(P11 - P12 P22^{-1} P21) over T >= 0 (convex on its
    domain, since it is the optimal rho of the LMI for fixed T) by Adam on log T, with a
    smoothed max eigenvalue. Any T it returns is only a proposal: the certificate decides."""
    import torch

    ws = [torch.as_tensor(w, dtype=torch.float64) for w in weights]
    n0 = weights[0].shape[1]
    if start is not None:  # it must keep the hidden block negative definite, else use ours
        start = np.where(nonneg_mask(weights, slopes), np.maximum(start, 0.0), start)
        hidden = -assemble(weights, slopes, start)[n0:, n0:]
        if np.linalg.eigvalsh((hidden + hidden.T) / 2)[0] <= 0:
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
        p = assemble(ws, slopes, multipliers(u), xp=torch)
        chol, info = torch.linalg.cholesky_ex(-p[n0:, n0:])
        if int(info) != 0:  # left the domain: step back towards the last good point
            with torch.no_grad():
                u.copy_((u + best_u) / 2)
            continue
        y = torch.linalg.solve_triangular(chol, p[n0:, :n0], upper=False)
        schur = p[:n0, :n0] + y.T @ y
        eig = torch.linalg.eigvalsh((schur + schur.T) / 2)
        value = float(eig[-1].detach())
        if value < best:
            best, best_u = value, u.detach().clone()
        sharp = 50.0 * (1 + it / 50) / max(abs(value), 1e-300)
        loss = torch.logsumexp(sharp * eig, 0) / sharp
        opt.zero_grad()
        loss.backward()
        opt.step()
        if time.perf_counter() - t0 > time_limit:
            break
    with torch.no_grad():
        lam = multipliers(best_u).numpy()
    return lam, {"status": f"first-order ({it + 1} steps)",
                 "solve_s": time.perf_counter() - t0}


def _certify_fixed(weights, slopes, lam, tau=None) -> tuple[float | None, str]:
    """A float-rigorous bound on the squared constant for fixed multipliers, or (None, why).

    l2 (``tau`` None): the smallest rho with M(rho, T) < 0, plus a margin. linf (``tau``
    the input weights of :func:`solve_lipsdp`): M = P(T) - s diag(tau) < 0 proves
    |df|^2 <= s dx^T diag(tau) dx <= s sum(tau) ||dx||_inf^2 for the scalar output of the
    last row; s* = lambda_max(D^-1/2 S D^-1/2) with S the Schur complement, and s sum(tau)
    is returned (rounded up)."""
    n0 = weights[0].shape[1]
    p = assemble(weights, slopes, lam)
    tau = None if tau is None else np.asarray(tau, dtype=np.float64)
    if tau is None or not np.max(tau, initial=0.0) > 0:
        in_w = np.ones(n0)
    else:  # a floor keeps D^-1/2 well conditioned; it costs <= n0 1e-6 max(tau) in sum(tau)
        in_w = np.maximum(tau, 1e-6 * float(np.max(tau)))
    inv = 1.0 / np.sqrt(in_w)
    rho = smallest_rho(inv[:, None] * p[:n0, :n0] * inv[None, :], inv[:, None] * p[:n0, n0:],
                       p[n0:, n0:])
    if rho is None:
        return None, "the multipliers do not make the hidden block negative definite"
    d = p.shape[0]
    scale = max(1.0, float(np.max(np.abs(np.diag(p)))))
    rho = max(rho, 0.0)
    abs_p = assemble(weights, slopes, lam, absolute=True)
    inner = max(w.shape[1] for w in weights) + 4
    formation = 4.0 * inner * U * float(np.linalg.norm(abs_p, "fro"))
    w_max = float(np.max(in_w))
    for bump in (1e-9, 1e-7, 1e-5, 1e-3):
        trial = math.nextafter(rho * (1 + bump) + bump * 1e-3 * scale / w_max, math.inf)
        m = p.copy()
        m[np.arange(n0), np.arange(n0)] -= trial * in_w
        if proves_positive_definite(-m, formation + 2.0 * U * trial * w_max * d):
            value = trial if tau is None else mul_up(trial, sum_up(in_w))
            return value, f"certified with margin {bump:g}"
    return None, "the Cholesky check of -M failed at every margin"


def certify_multipliers(weights, slopes, lam, tau=None) -> tuple[float | None, str]:
    """A float-rigorous squared bound for fixed multipliers (see :func:`_certify_fixed`),
    or (None, why); :func:`certify_and_repair` also returns the multipliers it proved."""
    rho, why, _ = certify_and_repair(weights, slopes, lam, tau)
    return rho, why


def certify_and_repair(weights, slopes, lam, tau=None):
    """(squared bound or None, why, the multipliers certified).

    Multipliers on the boundary of feasibility (common when the hidden block has no cross
    terms, as with GroupSort) cannot be proved in floating point; then we try
    (1 - theta) T + theta T_0 with the strictly feasible :func:`feasible_start` T_0: the LMI
    is convex in (rho, T), so the mixture is strictly feasible and its rho* is close (linf:
    the input weights are mixed towards uniform ones the same way; their scale s* is
    recomputed in any case)."""
    lam = np.asarray(lam, dtype=np.float64)
    lam = np.where(nonneg_mask(weights, slopes), np.maximum(lam, 0.0), lam)
    rho, why = _certify_fixed(weights, slopes, lam, tau)
    if rho is not None:
        return rho, why, lam
    start = feasible_start(weights, slopes)
    flat = None if tau is None else np.full(len(tau), float(np.mean(tau)))
    for theta in (1e-9, 1e-7, 1e-5, 1e-3, 1e-1):
        mixed = (1 - theta) * lam + theta * start
        mixed_tau = None if tau is None else (1 - theta) * np.asarray(tau) + theta * flat
        rho, _ = _certify_fixed(weights, slopes, mixed, mixed_tau)
        if rho is not None:
            return rho, f"certified after mixing {theta:g} of the feasible start in", mixed
    return None, why, None


def rescale(weights: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """Scale each W_k by a power of two near 1 / ||W_k|| (exact in floating point).

    f(x) = W_l phi(... phi(W_1 x)) with W_k = s_k V_k equals (prod s_k) g(x), where g uses
    V_k and the activations psi_k(t) = phi(c t) / c for the product c of the scales before
    them; psi_k has the same slope range, so LipSDP's bound for the V_k times prod s_k is a
    bound for f. Keeps the SDP well conditioned (ACAS Xu's weights reach 1e7).
    """
    scaled, factor = [], 1.0
    for w in weights:
        norm = float(np.linalg.norm(w, 2))
        e = 0 if norm == 0.0 else int(np.round(np.log2(norm)))
        scaled.append(np.ldexp(w, -e))
        factor = np.ldexp(factor, e)
    return scaled, float(factor)


def _compress(weights: list[np.ndarray]) -> list[np.ndarray]:
    w1 = weights[0]
    if w1.shape[1] <= w1.shape[0]:
        return weights
    _, r = np.linalg.qr(w1.T)  # W_1^T = Q R, Q orthonormal columns
    return [r.T, *weights[1:]]


def lmi_components(weights, slopes) -> list[tuple[int, int]]:
    """Index ranges of M that are the diagonal blocks of its block-diagonal structure.

    Hidden layer k couples to its input block only through the cross term (alpha + beta) T W
    of a slope restriction; GroupSort constraints have no cross term, so M splits there and
    the LMI becomes a chain of small ones (Pauli et al., ICLR 2024, Sec. 5)."""
    n0, _, blocks = _structure(weights)
    bounds = [(0, n0)] + [(n0 + row, n0 + row + w.shape[0]) for row, _, w in blocks]
    comps: list[list[int]] = [[0]]
    for k, qc in enumerate(slopes):
        coupled = not isinstance(qc, GroupQC) and (qc[0] + qc[1]) != 0
        if coupled:
            comps[-1].append(k + 1)
        else:
            comps.append([k + 1])
    return [(bounds[c[0]][0], bounds[c[-1]][1]) for c in comps]


def lmi_expression(weights, slopes, v, groups: list[np.ndarray], rho, cp):
    """The LMI matrix M(rho, T) as a cvxpy expression, built from :func:`assemble` (the same
    code the certificate checks): M = sum_j v_j (P(e_j) - P(0)) + P(0) - rho E, P linear in
    the multipliers; variable j sets the multiplier entries ``groups[j]``. ``rho`` is a
    scalar (l2: rho I on the input block) or a vector tau (linf: diag(tau))."""
    import scipy.sparse as sp

    n_lam = sum(len(g) for g in groups)
    n0 = weights[0].shape[1]
    base = assemble(weights, slopes, np.zeros(n_lam))
    d = base.shape[0]
    cols, rows, vals = [], [], []
    for j, idx in enumerate(groups):
        lam = np.zeros(n_lam)
        lam[idx] = 1.0
        column = (assemble(weights, slopes, lam) - base).reshape(-1)
        nz = np.flatnonzero(column)
        rows.append(nz)
        vals.append(column[nz])
        cols.append(np.full(nz.size, j))
    jac = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                        shape=(d * d, len(groups)))
    lmi = cp.reshape(jac @ v, (d, d), order="C") + base
    if rho.size == 1:
        e_in = np.zeros((d, d))
        e_in[:n0, :n0] = np.eye(n0)
        return lmi - rho * e_in
    diag = sp.csr_matrix((np.ones(n0), (np.arange(n0) * (d + 1), np.arange(n0))),
                         shape=(d * d, n0))
    return lmi - cp.reshape(diag @ rho, (d, d), order="C")


def solve_lipsdp(weights, slopes, form: str, solver: str, time_limit: float,
                 norm: str = "2", start: np.ndarray | None = None):
    """Solve the SDP; returns the multiplier vector and solver info.

    ``norm`` "inf" (for a single output row): minimise sum(tau) with diag(tau) in place of
    rho I, as in the linf LipSDP of Wang et al. (ICLR 2024) and Pauli et al. (ICLR 2024,
    Sec. 4.3); the input weights tau are returned in ``info["input_weights"]``."""
    if solver.lower() == "firstorder":
        if norm != "2":
            raise MethodNotApplicable("the first-order proposer is l2 only")
        return propose_first_order(weights, slopes, form, time_limit=time_limit, start=start)
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
        kwargs = {"time_limit_secs": time_limit, "eps_abs": 1e-5, "eps_rel": 1e-5,
                  "max_iters": 200_000}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # "may be inaccurate": the certificate decides
            warnings.simplefilter("ignore")
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


def slopes_of(chain: DenseChain) -> list:
    """Each hidden layer's quadratic constraint: (alpha, beta) or a GroupQC."""
    qcs = []
    for act, w in zip(chain.activations, chain.weights, strict=False):
        if isinstance(act, O.GroupSort):
            groups = np.asarray(act.groups, dtype=np.int64)
            if groups.max(initial=-1) >= w.shape[0] or \
                    np.unique(groups).size != groups.size:
                raise MethodNotApplicable("method lipsdp needs GroupSort on the layer's "
                                          "feature axis")
            qcs.append(GroupQC(groups))
        else:
            qcs.append(O.slope_range(act))
    return qcs


@dataclass(frozen=True)
class LipSDPSettings:
    form: str = setting("neuron", "multiplier structure: one per neuron, one per layer, or "
                                  "ECLipsE-Fast's closed form (no solver)",
                        choices=("neuron", "layer", "eclipse-fast"))
    solver: str = setting("auto", "who proposes the multipliers (the certificate decides)",
                          choices=SOLVERS)
    split: int = setting(0, "sub-chains of at most this many hidden layers (0: no split)",
                         minimum=0)
    time_limit: float = setting(60.0, "seconds for all proposers together", minimum=0,
                                exclusive=True)
    max_neurons: int | None = setting(None, f"refuse larger (sub-)chains (default "
                                            f"{MAX_NEURONS}; {8 * MAX_NEURONS} for "
                                            "eclipse-fast)", minimum=1)
    max_entries: int = setting(30_000_000, "conv layers are unrolled into matrices up to this "
                                           "many entries", minimum=1)


@register
class LipSDPEstimator(Estimator):
    name = "lipsdp"
    settings = LipSDPSettings
    deadline = ("time_limit", 0.7)
    summary = ("LipSDP (Neuron/Layer/ECLipsE-Fast forms, slope-restricted and GroupSort "
               "constraints, l2 and linf) for chains; every printed bound is a float-rigorously "
               "checked certificate")
    norms = ("2", "inf")
    handlers = {O.GroupSort: None, **{op: None for op in (*CHAIN_LINEAR_OPS, *SLOPE_RESTRICTED)}}

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:
        chain = dense_chain(graph, self.name, (*SLOPE_RESTRICTED, O.GroupSort),
                            options.get("max_entries"))
        form = str(options.get("form", "neuron")).lower()
        if form not in FORMS:
            raise MethodNotApplicable(f"lipsdp form {form!r}: use {', '.join(FORMS)}")
        if form == "eclipse-fast" and norm != "2":
            raise MethodNotApplicable("lipsdp form eclipse-fast is l2 only; use -o form=neuron "
                                      "for linf")
        slopes = slopes_of(chain)
        if not chain.activations:  # affine: exact
            return Bound(method=self.name, norm=norm, upper=affine_norm(chain.weights[0], norm),
                         notes=["affine model: exact operator norm"])
        solver = str(options.get("solver", "auto")).lower()
        if solver not in SOLVERS:
            raise MethodNotApplicable(f"lipsdp solver {solver!r}: use {', '.join(SOLVERS)}")
        split = int(options.get("split", 0))
        parts = split_chain(chain.weights, slopes, split)
        limit = int(options.get("max_neurons", MAX_NEURONS if form != "eclipse-fast"
                                else 8 * MAX_NEURONS))
        for weights, _ in parts:
            n_hidden = sum(w.shape[0] for w in weights[:-1])
            if n_hidden > limit:
                raise MethodNotApplicable(
                    f"method lipsdp refuses {n_hidden} hidden neurons in one (sub-)chain "
                    f"(limit {limit}); try -o split=2, -o form=eclipse-fast or -o "
                    "max_neurons=N")
        time_limit = float(options.get("time_limit", 60.0))
        progress = options.get("progress")
        total = 1.0
        details: dict[str, Any] = {"form": form, "solver": solver, "split": split,
                                   "norm": norm, "subchains": []}
        for k, (weights, part_slopes) in enumerate(parts):
            if progress:
                progress(f"solving sub-chain {k + 1} of {len(parts)}" if len(parts) > 1
                         else "solving")
            value, info = bound_subchain(weights, part_slopes, form, solver, time_limit, norm,
                                         progress)
            details["subchains"].append(info)
            if value is not None:
                value = checked(poison("lipsdp.rho", value),
                                f"lipsdp's certified value for sub-chain {k + 1}")
            if value is None:
                notes = [f"no certificate for sub-chain {k + 1} of {len(parts)}: "
                         f"{info['certificate']}; no bound printed (the solver's objective "
                         "is not a bound)"]
                return Bound(method=self.name, norm=norm, upper=None, notes=notes,
                             details=details)
            total = mul_up(total, value)
            if k < len(parts) - 1:  # the activation between two sub-chains
                qc = slopes[sum(len(pw) for pw, _ in parts[:k + 1]) - 1]
                total = mul_up(total, 1.0 if isinstance(qc, GroupQC)
                               else max(abs(qc[0]), abs(qc[1])))
        if len(parts) == 1:
            details.update({key: v for key, v in details["subchains"][0].items()})
        label = "ECLipsE-Fast" if form == "eclipse-fast" else f"LipSDP-{form.capitalize()}"
        if norm == "inf":
            label += (" (linf: diag(tau) input weights, one SDP per output, L^2 <= s sum tau)")
        notes = [f"{label}" + (f" on {len(parts)} sub-chains of <= {split} hidden layers, "
                               "multiplied with the boundary activations' max(|alpha|, "
                               "|beta|)" if len(parts) > 1 else "")]
        proposers = sorted({name for sc in details["subchains"] for name in sc["proposers"]})
        notes.append(f"multipliers proposed by {', '.join(proposers)}; every value from a "
                     "checked certificate")
        return Bound(method=self.name, norm=norm, upper=total, notes=notes, details=details)


INTERIOR_POINT_SIZE = 40  # Clarabel in "auto" up to this LMI size (its cost grows like d^6)


def affine_norm(matrix: np.ndarray, norm: str) -> float:
    """Exact operator norm of an affine map's matrix, rounded up."""
    from .layer_norms import max_row_abs_sum, spectral_norm

    return spectral_norm(matrix) if norm == "2" else max_row_abs_sum(matrix)


def auto_proposers(size: int, n_hidden: int, split_lmi: bool, norm: str,
                   slopes: list) -> list[str]:
    """Who proposes multipliers in ``solver=auto`` (measured, bench/results/lipsdp.txt):
    Clarabel for a single small LMI (interior point, accurate, cost ~ size^6), SCS up to
    :data:`SCS_NEURONS` hidden neurons (and always for a chain of small LMIs, where Clarabel
    fails at the boundary-feasible optimum); beyond (l2 only), ECLipsE-Fast's certified
    multipliers where its slopes allow, then the first-order method started from them (on
    deep chains first-order alone was measured 2-3x worse than SCS)."""
    if size <= INTERIOR_POINT_SIZE and not split_lmi:
        return ["clarabel"]
    if norm != "2":
        return ["scs"]
    if n_hidden <= SCS_NEURONS:
        return ["scs"]
    return ["eclipse-fast", "firstorder"] if eclipse_applies(slopes) else ["firstorder"]


def eclipse_applies(slopes) -> bool:
    """ECLipsE-Fast's closed form needs slope ranges [0, beta] (no GroupSort)."""
    return all(not isinstance(q, GroupQC) and q[0] == 0.0 for q in slopes)


FORMS = ("neuron", "layer", "eclipse-fast")


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


def eclipse_fast_multipliers(weights, slopes) -> np.ndarray:
    """ECLipsE-Fast (Xu and Sivaranjani, NeurIPS 2024, Alg. 2) for slopes [0, beta]:
    X_0 = I, l_i = 1 / (2 m^2 lambda_max(W_i X_{i-1}^{-1} W_i^T)), m = beta / 2,
    X_i = l_i I - l_i^2 m^2 W_i X_{i-1}^{-1} W_i^T. Returns the layer multipliers l_i
    (repeated per neuron); the bound itself comes from the certificate check."""
    x_prev = np.eye(weights[0].shape[1])
    lam = []
    for w, qc in zip(weights[:-1], slopes, strict=True):
        if isinstance(qc, GroupQC) or qc[0] != 0.0:
            raise MethodNotApplicable("lipsdp form eclipse-fast needs slope ranges [0, beta] "
                                      "(ReLU, Sigmoid, Tanh, Clip)")
        m = qc[1] / 2.0
        k = w @ np.linalg.solve(x_prev, w.T)
        k = (k + k.T) / 2
        li = 1.0 / (2.0 * m * m * float(np.linalg.eigvalsh(k)[-1]))
        x_prev = li * np.eye(w.shape[0]) - li * li * m * m * k
        lam.append(np.full(w.shape[0], li))
    return np.concatenate(lam)


def _eclipse_certificate(weights, slopes):
    """Certify the ECLipsE-Fast direction T: rho*(c T) is convex in c, so a golden-section
    search on log c finds the best scale; every value is a checked certificate. Returns
    (rho, why, multipliers) with rho None when no scale was certified."""
    direction = eclipse_fast_multipliers(weights, slopes)
    best: tuple[float | None, str, np.ndarray | None] = (None, "no scale certified", None)

    def value(log_c: float) -> float:
        nonlocal best
        lam = math.exp(log_c) * direction
        rho, why = _certify_fixed(weights, slopes, lam)
        if rho is not None and (best[0] is None or rho < best[0]):
            best = (rho, why, lam)
        return math.inf if rho is None else rho

    lo, hi = -30.0, 30.0
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = value(a), value(b)
    for _ in range(60):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = value(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = value(b)
    return best


def bound_subchain(weights: list[np.ndarray], slopes: list, form: str, solver: str,
                   time_limit: float, norm: str = "2",
                   progress=None) -> tuple[float | None, dict[str, Any]]:
    """Certified l2 or linf bound of one chain (None if no certificate) and what was done.

    linf bounds each output row on its own (one SDP with input weights diag(tau) each) and
    takes the largest; the input is not compressed there (linf is not rotation invariant)."""
    t0 = time.perf_counter()
    if not slopes:  # a single affine map (the tail of a split chain)
        return affine_norm(weights[0], norm), {
            "hidden_neurons": 0, "build_s": 0.0, "solve_s": 0.0,
            "check_s": time.perf_counter() - t0, "proposers": ["exact"],
            "solver_status": {}, "certificate": "exact operator norm (affine)"}
    scaled, factor = rescale(weights)
    n_hidden = sum(w.shape[0] for w in weights[:-1])
    t1 = time.perf_counter()
    if norm == "2":
        rows = [(_compress(scaled), scaled)]
    else:
        rows = [(r, r) for r in ([*scaled[:-1], scaled[-1][j:j + 1]]
                                 for j in range(scaled[-1].shape[0]))]
    size = rows[0][0][0].shape[1] + n_hidden
    split_lmi = len(lmi_components(rows[0][0], slopes)) > 1
    auto = solver == "auto" and form != "eclipse-fast"
    proposers = ["eclipse-fast"] if form == "eclipse-fast" else \
        auto_proposers(size, n_hidden, split_lmi, norm, slopes) if auto else [solver]
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
    brings in the first-order proposer as well (l2). The first-order method starts from the
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
        limit = min(limit, SCS_AUTO_SECONDS) if auto and name == "scs" else limit
        if name == "eclipse-fast":  # closed form; its golden search is all checking
            candidate, why, lam = _eclipse_certificate(check_weights, slopes)
            status, tc = "closed form", ts
        else:
            start = best_lam if name == "firstorder" else None
            if name == "firstorder" and start is None and norm == "2" and \
                    eclipse_applies(slopes):  # a far better start than feasible_start
                start = _eclipse_certificate(check_weights, slopes)[2]
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
        if auto and norm == "2" and not clean and "firstorder" not in proposers:
            proposers.append("firstorder")
            info["proposers"].append("firstorder")
            queue.append("firstorder")
    return best
