"""Block-tridiagonal linear algebra for the LipSDP certificate.

A chain's LMI matrix is block tridiagonal in the order [input, hidden 1, ..., hidden K]
(:class:`~.lmi.BlockTridiagonal`): its Cholesky factor is block bidiagonal and the Schur
complement of the hidden block runs layer by layer, at a cost of sum_k n_k^3 operations and
sum_k n_k^2 memory instead of (sum_k n_k)^3 and (sum_k n_k)^2 (the sequential structure
behind ECLipsE, Xu and Sivaranjani, NeurIPS 2024). See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sla

from ...rounding import rump_shift
from .eigen import top_eigenpairs
from .lmi import BlockTridiagonal

#: what scipy/numpy raise when a factorisation fails (ValueError: NaN or inf entries)
LINALG_FAILED = (np.linalg.LinAlgError, sla.LinAlgError, ValueError)


def negated(m: BlockTridiagonal) -> BlockTridiagonal:
    return BlockTridiagonal([-d for d in m.diag], [-b for b in m.sub])


def trace(m: BlockTridiagonal) -> float:
    return float(sum(np.trace(d) for d in m.diag))


def frobenius(m: BlockTridiagonal) -> float:
    """||M||_F; an upper bound on the spectral norm of M."""
    total = sum(float(np.sum(d * d)) for d in m.diag) + \
        2.0 * sum(float(np.sum(b * b)) for b in m.sub)
    return math.sqrt(total)


def cholesky_runs(m: BlockTridiagonal, shift: float) -> bool:
    """Whether the floating-point Cholesky factorisation of M - shift I runs to completion.

    Computed by blocks: L_kk = chol(D_k - shift I - L_{k,k-1} L_{k,k-1}^T) and
    L_{k+1,k} = B_k L_kk^{-T}. This is the Cholesky algorithm with another order of
    evaluation: every entry is still (a_ij - a sum of products) / l_jj, and the entries
    outside the band are exact zeros in any order. The error bound
    L L^T = A + dA, |dA| <= gamma_{n+1} |L| |L^T| holds for every order of evaluation
    (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., Lemma 8.4 and
    Thm 10.3), and it is all that Rump's test (BIT 2006, Thm 2.3) uses."""
    below = None  # L_{k,k-1}
    for k, d in enumerate(m.diag):
        a = d - shift * np.eye(d.shape[0])
        if below is not None:
            a = a - below @ below.T
        try:
            chol = sla.cholesky(a, lower=True, check_finite=True)
            if k < len(m.sub):
                below = sla.solve_triangular(chol, m.sub[k].T, lower=True,
                                             check_finite=True).T
        except LINALG_FAILED:
            return False
    return True


def proves_positive_definite(a: BlockTridiagonal, formation_error: float) -> bool:
    """True only if the exact matrix (fl(a) +- formation_error in spectral norm) is positive
    definite (Rump, "Verification of positive definiteness", BIT 2006, Thm 2.3): the
    floating-point Cholesky of A - c I runs with c >= gamma_{n+1} / (1 - 2 gamma_{n+1})
    trace(A) (no underflow), plus the formation error."""
    c = rump_shift(sum(a.sizes()), trace(a), formation_error)
    if not math.isfinite(c):
        return False
    return cholesky_runs(a, c)


def input_schur(m: BlockTridiagonal, xp=np):
    """The Schur complement D_0 - B_0^T H^{-1} B_0 of the hidden block H when H is
    (numerically) negative definite, else None.

    Backward sweep: S_K = D_K, S_k = D_k - B_k^T S_{k+1}^{-1} B_k; H < 0 iff every S_k < 0,
    and the first block of H^{-1} is S_1^{-1}. Each step is one Cholesky factorisation of
    -S_{k+1} and one triangular solve. ``xp`` numpy, or torch (differentiable in the
    blocks)."""
    if len(m.diag) == 1:
        return m.diag[0]
    got = schur_factors(m, xp, keep=False)
    return None if got is None else got[0]


def schur_factors(m: BlockTridiagonal, xp=np, keep: bool = True):
    """:func:`input_schur` with its factors: (S, factors) with factors[k - 1] = (C_k, Y_k),
    -S_k = C_k C_k^T and Y_k = C_k^-1 B_{k-1} (an empty list unless ``keep``), or None when
    the hidden block is not (numerically) negative definite. ``xp`` numpy, or torch (the
    first-order proposer does not differentiate it: its gradient comes from
    :func:`hidden_maximisers`)."""
    schur, factors = m.diag[-1], []
    for k in range(len(m.diag) - 1, 0, -1):
        if xp is np:
            try:
                chol = sla.cholesky(-schur, lower=True, check_finite=True)
                y = sla.solve_triangular(chol, m.sub[k - 1], lower=True, check_finite=True)
            except LINALG_FAILED:
                return None
        else:
            chol, info = xp.linalg.cholesky_ex(-schur)
            if int(info) != 0:
                return None
            y = xp.linalg.solve_triangular(chol, m.sub[k - 1], upper=False)
        if keep:
            factors.append((chol, y))
        schur = m.diag[k - 1] + y.T @ y
        schur = (schur + schur.T) / 2
    factors.reverse()
    finite = np.all(np.isfinite(schur)) if xp is np else bool(xp.isfinite(schur).all())
    return (schur, factors) if finite else None


def hidden_maximisers(factors, v, xp=np) -> list:
    """z = (v, u_1, ..., u_K) with u the maximiser of z^T M z over the hidden blocks for
    fixed input part v (columns: one problem each), so z^T M z = v^T S v with S the Schur
    complement. Block elimination of the stationarity conditions: u_k = C_k^-T Y_k u_{k-1}
    (u_0 = v), with the factors of :func:`schur_factors` (numpy or torch, ``xp``). By
    Danskin's theorem the gradient of v^T S(T) v in the multipliers at fixed v is that of
    z^T M(T) z at fixed z: what the first-order proposer differentiates."""
    zs = [v]
    for chol, y in factors:
        if xp is np:
            zs.append(sla.solve_triangular(chol, y @ zs[-1], lower=True, trans="T"))
        else:
            zs.append(xp.linalg.solve_triangular(chol.T, y @ zs[-1], upper=True))
    return zs


def largest_eigenvalue(a: np.ndarray, lanczos: bool = False) -> float:
    """lambda_max of a symmetric matrix: LAPACK's MRRR for the top eigenvalue only, or with
    ``lanczos`` :func:`.eigen.top_eigenpairs` (Lanczos to machine precision from
    :data:`.eigen.LANCZOS_FROM` on). An estimate either way: the certificate proves its own
    margin above it."""
    if lanczos:
        return float(top_eigenpairs(a, 1, vectors=False)[-1])
    n = a.shape[0]
    return float(sla.eigvalsh(a, subset_by_index=[n - 1, n - 1], check_finite=False)[-1])
