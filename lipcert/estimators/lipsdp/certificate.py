"""Checking a LipSDP certificate in float64, independently of the solver.

An SDP solver returns an approximate point; "optimal" can be infeasible. Given multipliers
T (clipped to be nonnegative) we compute the smallest valid rho and prove M(rho, T) < 0 with
a Cholesky factorisation whose success is a proof (Rump, "Verification of positive
definiteness", BIT 2006, Thm 2.3): if the floating-point Cholesky of A - c I succeeds with
c >= gamma_{n+1} / (1 - 2 gamma_{n+1}) trace(A) (no underflow), then A is positive definite.
We add to c a bound on the error of forming A itself. Both run on the matrix's blocks
(:mod:`.banded`): a chain's LMI is block tridiagonal.
"""

from __future__ import annotations

import math
from typing import Any  # noqa: F401

import numpy as np

from ...rounding import UNIT_ROUNDOFF as U
from ...rounding import mul_up, sum_up
from ..common.progress import report
from .banded import (
    frobenius,
    input_schur,
    largest_eigenvalue,
    negated,
    proves_positive_definite,
)
from .lmi import BlockTridiagonal, feasible_start, lmi_blocks, lmi_size, nonneg_mask


def _with_input_block(m: BlockTridiagonal, first: np.ndarray, first_sub) -> BlockTridiagonal:
    return BlockTridiagonal([first, *m.diag[1:]], [first_sub, *m.sub[1:]])


def estimate_rho(weights, slopes, lam) -> float | None:
    """rho*(T) = lambda_max(P11 - P12 P22^{-1} P21) for fixed multipliers, in floating point
    and unchecked (None when the hidden block is not negative definite): what the searches
    over multipliers compare; only :func:`_certify_fixed` proves a value."""
    schur = input_schur(lmi_blocks(weights, slopes, lam))
    return None if schur is None else largest_eigenvalue(schur, lanczos=True)


def _certify_fixed(weights, slopes, lam, tau=None) -> tuple[float | None, str]:
    """A float-rigorous bound on the squared constant for fixed multipliers, or (None, why).

    l2 (``tau`` None): the smallest rho with M(rho, T) < 0, plus a margin. linf (``tau``
    the input weights of :func:`solve_lipsdp`): M = P(T) - s diag(tau) < 0 proves
    |df|^2 <= s dx^T diag(tau) dx <= s sum(tau) ||dx||_inf^2 for the scalar output of the
    last row; s* = lambda_max(D^-1/2 S D^-1/2) with S the Schur complement, and s sum(tau)
    is returned (rounded up). Every step runs on the blocks of P (:mod:`.banded`)."""
    n0 = weights[0].shape[1]
    p = lmi_blocks(weights, slopes, lam)
    tau = None if tau is None else np.asarray(tau, dtype=np.float64)
    if tau is None or not np.max(tau, initial=0.0) > 0:
        in_w = np.ones(n0)
    else:  # a floor keeps D^-1/2 well conditioned; it costs <= n0 1e-6 max(tau) in sum(tau)
        in_w = np.maximum(tau, 1e-6 * float(np.max(tau)))
    inv = 1.0 / np.sqrt(in_w)
    scaled = _with_input_block(p, inv[:, None] * p.diag[0] * inv[None, :],
                               p.sub[0] * inv[None, :])
    schur = input_schur(scaled)
    if schur is None:
        return None, "the multipliers do not make the hidden block negative definite"
    rho = max(largest_eigenvalue(schur), 0.0)
    d = sum(p.sizes())
    scale = max(1.0, max(float(np.max(np.abs(np.diag(b)))) for b in p.diag))
    inner = max(max(w.shape) for w in weights) + 4  # longest dot product forming P
    formation = 4.0 * inner * U * frobenius(lmi_blocks(weights, slopes, lam, absolute=True))
    w_max = float(np.max(in_w))
    for bump in (1e-9, 1e-7, 1e-5, 1e-3):
        trial = math.nextafter(rho * (1 + bump) + bump * 1e-3 * scale / w_max, math.inf)
        first = p.diag[0].copy()
        first[np.arange(n0), np.arange(n0)] -= trial * in_w
        m = _with_input_block(p, first, p.sub[0])
        if proves_positive_definite(negated(m), formation + 2.0 * U * trial * w_max * d):
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
    if not all(np.all(np.isfinite(w)) for w in weights):
        return None, "a weight is NaN or infinite: no certificate", None
    lam = np.asarray(lam, dtype=np.float64)
    lam = np.where(nonneg_mask(weights, slopes), np.maximum(lam, 0.0), lam)
    size = lmi_size(weights)
    report(f"checking the certificate (size {size})")
    rho, why = _certify_fixed(weights, slopes, lam, tau)
    if rho is not None:
        return rho, why, lam
    report("repairing: mixing in a feasible start")
    start = feasible_start(weights, slopes)
    flat = None if tau is None else np.full(len(tau), float(np.mean(tau)))
    for theta in (1e-9, 1e-7, 1e-5, 1e-3, 1e-1):
        mixed = (1 - theta) * lam + theta * start
        mixed_tau = None if tau is None else (1 - theta) * np.asarray(tau) + theta * flat
        rho, _ = _certify_fixed(weights, slopes, mixed, mixed_tau)
        if rho is not None:
            return rho, f"certified after mixing {theta:g} of the feasible start in", mixed
    return None, why, None

