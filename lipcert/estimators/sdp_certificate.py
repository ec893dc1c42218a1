"""Checking a LipSDP certificate in float64, independently of the solver.

An SDP solver returns an approximate point; "optimal" can be infeasible. Given multipliers
T (clipped to be nonnegative) we compute the smallest valid rho exactly and prove
M(rho, T) < 0 with a Cholesky factorisation whose success is a proof (Rump, "Verification of
positive definiteness", BIT 2006, Thm 2.3): if the floating-point Cholesky of A - c I succeeds
with c >= gamma_{n+1} / (1 - 2 gamma_{n+1}) trace(A) (no underflow), then A is positive
definite. We add to c a bound on the error of forming A itself.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sla

U = 2.0**-53


def _gamma(n: int) -> float:
    return n * U / (1.0 - n * U)


def proves_positive_definite(a: np.ndarray, formation_error: float) -> bool:
    """True only if the exact matrix (fl(a) +- formation_error in spectral norm) is PD."""
    n = a.shape[0]
    g = _gamma(n + 1)
    c = g / (1.0 - 2.0 * g) * float(np.trace(a)) + formation_error
    c = math.nextafter(c * (1.0 + 4 * U), math.inf)
    try:
        sla.cholesky(a - c * np.eye(n), lower=True, check_finite=True)
    except (np.linalg.LinAlgError, sla.LinAlgError, ValueError):
        return False
    return True


def smallest_rho(p11: np.ndarray, p12: np.ndarray, p22: np.ndarray) -> float | None:
    """lambda_max(P11 - P12 P22^{-1} P21) when P22 < 0 (numerically), else None."""
    try:
        chol = sla.cholesky(-p22, lower=True)
    except (np.linalg.LinAlgError, sla.LinAlgError, ValueError):  # ValueError: NaN/inf
        return None
    y = sla.solve_triangular(chol, p12.T, lower=True)  # (-P22)^{-1/2} P21
    schur = p11 + y.T @ y  # P11 - P12 P22^{-1} P21
    schur = (schur + schur.T) / 2
    if not np.all(np.isfinite(schur)):
        return None
    return float(sla.eigvalsh(schur)[-1])
