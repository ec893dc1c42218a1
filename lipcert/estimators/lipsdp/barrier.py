"""A primal barrier method for LipSDP that uses the low rank of its constraint matrices.

minimise c^T x  s.t.  N(x) = -M(rho, T) > 0, T's signed entries > 0, by Newton's method on
t c^T x - log det N(x) - sum log x_signed for growing t (Boyd and Vandenberghe, Convex
Optimization, 2004, Sec. 11.3, Alg. 11.1; Newton with backtracking, Sec. 9.5).

Each multiplier's matrix is low rank: a slope-restricted neuron i of layer k adds
lam_i [w_i e_i] [[-2ab, a+b], [a+b, -2]] [w_i e_i]^T to P (w_i its weight row placed at the
layer's input, e_i its own unit vector; Fazlyab et al., NeurIPS 2019, Thm 2), a GroupSort
group adds lam_j sum_r (w_r w_r^T - e_r e_r^T) and gamma_j (sum w_r)(sum w_r)^T -
(sum e_r)(sum e_r)^T (Pauli et al., ICLR 2024, Sec. 4). With G_j = Q_j C_j Q_j^T and
K = Q^T N^{-1} Q, the gradient and Hessian of -log det N are -tr(C_j K_jj) and
tr(C_j K_jk C_k K_kj): one factorisation of N and one product Q^T N^{-1} Q per step
(the low-rank form of the Hessian used by dual-scaling SDP codes: Benson, Ye and Zhang,
SIAM J. Optim. 2000). The point it returns is a proposal like any other: the
certificate checks it.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp

from ..common.progress import report
from .banded import LINALG_FAILED
from .certificate import estimate_rho
from .lmi import GroupQC, assemble, feasible_start, nonneg_mask, parameter_groups

SINGLE_THREAD_SIZE = 1024  # see _blas_threads
PENALTY = 1e-9
MU = 10.0  # t grows by this factor per centring (bench/lipsdp.py measures the choice)


@dataclass
class LowRankBasis:
    """Columns Q (d x m), the block-diagonal coupling C (m x m, sparse) and the map S
    (m x n_vars, sparse) from columns to variables: G_j = sum over j's columns."""

    q: np.ndarray
    c: sp.csr_matrix
    s: sp.csr_matrix


def multiplier_basis(weights, slopes) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per multiplier entry: its columns (d x r) and its r x r coupling, with P(lam) - P(0)
    = sum_i lam_i Q_i C_i Q_i^T in :func:`~.lmi.assemble`'s layout."""
    n0 = weights[0].shape[1]
    d = n0 + sum(w.shape[0] for w in weights[:-1])
    cols_q, cols_c = [], []
    row, col = n0, 0
    for w, qc in zip(weights[:-1], slopes, strict=True):
        def placed(vectors_w, vectors_e, w=w, row=row, col=col):
            q = np.zeros((d, len(vectors_w) + len(vectors_e)))
            for j, v in enumerate(vectors_w):
                q[col:col + w.shape[1], j] = v
            for j, v in enumerate(vectors_e):
                q[row:row + w.shape[0], len(vectors_w) + j] = v
            return q

        if isinstance(qc, GroupQC):
            lam_q, gam_q = [], []
            for members in qc.groups:
                e = np.zeros((len(members), w.shape[0]))
                e[np.arange(len(members)), members] = 1.0
                lam_q.append(placed(list(w[members]), list(e)))
                gam_q.append(placed([w[members].sum(0)], [e.sum(0)]))
            g = qc.groups.shape[1]
            for q in lam_q:
                cols_q.append(q)
                cols_c.append(np.diag(np.r_[np.ones(g), -np.ones(g)]))
            for q in gam_q:
                cols_q.append(q)
                cols_c.append(np.diag([1.0, -1.0]))
        else:
            alpha, beta = qc
            coupling = np.array([[-2.0 * alpha * beta, alpha + beta], [alpha + beta, -2.0]])
            for r in range(w.shape[0]):
                e = np.zeros(w.shape[0])
                e[r] = 1.0
                cols_q.append(placed([w[r]], [e]))
                cols_c.append(coupling)
        row += w.shape[0]
        col += w.shape[1]
    return cols_q, cols_c


def _basis(weights, slopes, form: str, norm: str) -> tuple[LowRankBasis, list[np.ndarray]]:
    """The basis of N(x) = -P(lam(x)) + rho E (l2) or + diag(tau) (linf) for the variables
    x = [rho or tau_1..tau_n0, v_1, ..]; returns it and the multiplier groups."""
    n0 = weights[0].shape[1]
    d = n0 + sum(w.shape[0] for w in weights[:-1])
    per_q, per_c = multiplier_basis(weights, slopes)
    groups = parameter_groups(weights, slopes, form)
    eye = np.zeros((d, n0))
    eye[np.arange(n0), np.arange(n0)] = 1.0
    blocks_q, blocks_c, owner = [eye], [np.eye(n0)], []
    owner += [0] * n0 if norm == "2" else list(range(n0))
    n_rho = 1 if norm == "2" else n0
    for j, idx in enumerate(groups):
        for i in idx:
            blocks_q.append(per_q[i])
            blocks_c.append(-per_c[i])  # N = -P: the multipliers enter with a minus sign
            owner += [n_rho + j] * per_q[i].shape[1]
    q = np.concatenate(blocks_q, axis=1)
    c = sp.block_diag(blocks_c, format="csr")
    c.eliminate_zeros()  # dense blocks (the identity) store their zeros otherwise
    s = sp.csr_matrix((np.ones(len(owner)), (np.arange(len(owner)), owner)),
                      shape=(len(owner), n_rho + len(groups)))
    return LowRankBasis(q, c, s), groups


class _Problem:
    """N(x), the barrier and its derivatives for one LipSDP instance."""

    def __init__(self, weights, slopes, form: str, norm: str):
        self.weights, self.slopes, self.norm = weights, slopes, norm
        self.n0 = weights[0].shape[1]
        self.basis, self.groups = _basis(weights, slopes, form, norm)
        self.n_rho = 1 if norm == "2" else self.n0
        positive = nonneg_mask(weights, slopes)
        self.n_lam = len(positive)
        signed_vars = [positive[g[0]] for g in self.groups]
        self.signed = np.r_[np.full(self.n_rho, norm != "2"), np.array(signed_vars, bool)]
        self.cost = np.r_[np.ones(self.n_rho), np.zeros(len(self.groups))]

    def regularise(self, start: np.ndarray, objective: float) -> None:
        """Cost PENALTY * objective / sum(start) per unit of multiplier. A multiplier that
        does not enter the objective (a neuron whose outgoing weights are zero, say) would
        otherwise grow without bound towards the barrier's infimum (measured: 4e11 on
        digits_mlp), and the certificate's rounding margins grow with the trace of M. The
        penalty moves the optimum by at most PENALTY times the objective per unit of
        sum(T*) / sum(T_0)."""
        total = float(np.sum(np.abs(start)))
        if total > 0 and objective > 0:
            sizes = np.array([len(g) for g in self.groups], dtype=np.float64)
            weights = np.where(self.signed[self.n_rho:], sizes, 0.0)
            self.cost[self.n_rho:] = PENALTY * objective * weights / total
        self.nu = self.basis.q.shape[0] + int(self.signed.sum())  # barrier parameter

    def multipliers(self, x: np.ndarray) -> np.ndarray:
        lam = np.zeros(self.n_lam)
        for j, idx in enumerate(self.groups):
            lam[idx] = x[self.n_rho + j]
        return lam

    def factor(self, x: np.ndarray):
        """Cholesky factor of N(x), or None outside the domain."""
        if np.any(x[self.signed] <= 0) or not np.all(np.isfinite(x)):
            return None
        n = -assemble(self.weights, self.slopes, self.multipliers(x))
        n[np.arange(self.n0), np.arange(self.n0)] += x[:self.n_rho]
        try:
            return sla.cholesky((n + n.T) / 2, lower=True, check_finite=True)
        except LINALG_FAILED:
            return None

    def barrier(self, x: np.ndarray, chol) -> float:
        return -2.0 * float(np.sum(np.log(np.diag(chol)))) - \
            float(np.sum(np.log(x[self.signed])))

    def derivatives(self, x: np.ndarray, chol) -> tuple[np.ndarray, np.ndarray]:
        b = self.basis
        z = sla.solve_triangular(chol, b.q, lower=True, check_finite=False)
        k = z.T @ z  # Q^T N^-1 Q
        ck = b.c @ k
        grad = -(b.s.T @ np.asarray(b.c.multiply(k).sum(axis=1)).ravel())
        hess = b.s.T @ (b.s.T @ (np.asarray(ck @ b.c) * k).T).T  # S^T ((C K C) o K) S
        xs = x[self.signed]
        grad[self.signed] -= 1.0 / xs
        hess[self.signed, self.signed] += 1.0 / xs**2
        return grad, (hess + hess.T) / 2


def _newton_direction(hess: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """-H^{-1} g with Jacobi scaling (the variables span many orders of magnitude)."""
    scale = 1.0 / np.sqrt(np.maximum(np.diag(hess), 1e-300))
    h = scale[:, None] * hess * scale[None, :]
    try:
        y = sla.cho_solve(sla.cho_factor(h, lower=True), -scale * grad)
    except LINALG_FAILED:
        y = np.linalg.lstsq(h, -scale * grad, rcond=None)[0]
    return scale * y


def propose_barrier(weights, slopes, form: str, norm: str = "2", time_limit: float = 60.0,
                    tolerance: float = 1e-7, max_steps: int = 600, mu: float = MU):
    """Multipliers from the barrier method (l2: minimise rho; linf: sum(tau), one output
    row). Returns (multipliers or None, info); linf puts tau in ``info["input_weights"]``.

    Starts from :func:`~.lmi.feasible_start` with rho (or a uniform tau) above rho*(T_0),
    picks t_0 = argmin ||t c + g||_{H^-1} (Boyd and Vandenberghe, Sec. 11.3.1), multiplies
    t by 20 after each centring, and stops when the duality gap nu / t is below
    ``tolerance`` times the objective."""
    size = weights[0].shape[1] + sum(w.shape[0] for w in weights[:-1])
    with _blas_threads(size):
        return _barrier(weights, slopes, form, norm, time_limit, tolerance, max_steps, mu)


@contextlib.contextmanager
def _blas_threads(size: int):
    """One BLAS thread for LMIs up to SINGLE_THREAD_SIZE: at size 62 a Newton step was
    measured 3.7x faster on one thread than on two (thread start-up dominates such small
    products); a step's kernels (Cholesky, triangular solve with 1.6 d columns, Z^T Z) on
    the 2-core machine, torch loaded: 38 vs 64 ms at d = 512, 219 vs 258 ms at 1024, and
    735 vs 576 ms at 1600, where two threads win. A 3x8x8 two-conv net (LMI 512): 22.6 s
    -> 16.0 s."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # a dependency; without it the method only runs slower
        threadpool_limits = None
    if size > SINGLE_THREAD_SIZE or threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _line_search(prob: _Problem, x, chol, dx, t: float, decrement: float):
    """Backtracking (Armijo, 1/4) from the Newton step; when the full step is accepted,
    longer steps 2, 4, .., 64 are tried while they keep lowering the barrier: a
    multiplier far below its optimum only doubles per Newton step (Newton on
    a x - log x from below), and the neuron form has one per neuron. Returns
    (x, chol, moved)."""
    def value(point, factor):
        return t * float(prob.cost @ point) + prob.barrier(point, factor)

    f0, step = value(x, chol), 1.0
    for _ in range(60):
        trial = x + step * dx
        tchol = prob.factor(trial)
        if tchol is not None and value(trial, tchol) <= f0 - 0.25 * step * decrement:
            break
        step *= 0.5
    else:
        return x, chol, False
    best = (value(trial, tchol), trial, tchol)
    while step == 1.0 or 1.0 < step < 64.0:  # longer steps only after a full one
        step *= 2.0
        longer = x + step * dx
        lchol = prob.factor(longer)
        if lchol is None or not value(longer, lchol) < best[0]:
            break
        best = (value(longer, lchol), longer, lchol)
    return best[1], best[2], True


def _initial_t(prob: _Problem, x, chol) -> float:
    """t_0 = argmin_t ||t c + g||_{H^-1} (Boyd and Vandenberghe, Sec. 11.3.1)."""
    grad, hess = prob.derivatives(x, chol)
    hc = _newton_direction(hess, -prob.cost)  # H^-1 c
    hg = _newton_direction(hess, -grad)
    t = -float(prob.cost @ hg) / float(prob.cost @ hc) if prob.cost @ hc > 0 else 0.0
    return t if t > 0 and math.isfinite(t) else prob.nu / max(float(prob.cost @ x), 1e-12)


def _barrier(weights, slopes, form, norm, time_limit, tolerance, max_steps, mu):
    t_start = time.perf_counter()
    deadline = t_start + time_limit
    prob = _Problem(weights, slopes, form, norm)
    start = feasible_start(weights, slopes)
    rho0 = estimate_rho(weights, slopes, start)
    x = None
    if rho0 is not None:
        rho0 = max(rho0, 0.0) * 1.1 + 1e-6 * max(1.0, abs(rho0))
        x = np.r_[np.full(prob.n_rho, rho0), [start[g].mean() for g in prob.groups]]
    chol = None if x is None else prob.factor(x)
    if chol is None:
        return None, {"status": "barrier: no strictly feasible start",
                      "solve_s": time.perf_counter() - t_start}
    prob.regularise(start, rho0)
    t = _initial_t(prob, x, chol)
    steps, status = 0, "barrier: step limit"
    while steps < max_steps and status == "barrier: step limit":
        for _ in range(max_steps - steps):  # centring
            grad, hess = prob.derivatives(x, chol)
            g = t * prob.cost + grad
            dx = _newton_direction(hess, g)
            decrement = -float(g @ dx)
            steps += 1
            if not decrement > 1e-5:
                break
            x, chol, moved = _line_search(prob, x, chol, dx, t, decrement)
            if not moved or time.perf_counter() > deadline:
                break
        objective, gap = float(prob.cost @ x), prob.nu / t
        report(f"barrier: {steps} Newton steps, objective {objective:.6g}, gap {gap:.2g}")
        if gap <= tolerance * max(objective, 1e-300):
            status = f"barrier ({steps} Newton steps, gap {gap:.2g})"
        elif time.perf_counter() > deadline:
            status = f"barrier: time limit ({steps} Newton steps, gap {gap:.2g})"
        t *= mu
    info = {"status": status, "solve_s": time.perf_counter() - t_start}
    if norm != "2":
        info["input_weights"] = x[:prob.n_rho].copy()
    return prob.multipliers(x), info
