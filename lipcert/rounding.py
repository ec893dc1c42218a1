"""Directed rounding helpers: every factor of a printed bound is rounded upwards.

IEEE-754 round-to-nearest makes fl(a op b) within one ulp of the exact result, so taking the
next float upwards after each operation gives a value >= the exact one.
"""

from __future__ import annotations

import math

import numpy as np

EPS = float(np.finfo(np.float64).eps)
UNIT_ROUNDOFF = EPS / 2  # u = 2^-53: |fl(a op b) - a op b| <= u |a op b|


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u) (Higham, Accuracy and Stability, 2nd ed., Lemma 3.1)."""
    return n * UNIT_ROUNDOFF / (1.0 - n * UNIT_ROUNDOFF)


def rump_shift(n: int, trace: float, formation_error: float = 0.0) -> float:
    """The shift c for Rump's test of positive definiteness ("Verification of positive
    definiteness", BIT 2006, Thm 2.3): if the floating-point Cholesky factorisation of
    fl(A) - c I runs to completion for an n x n symmetric fl(A) with
    c >= gamma_{n+1} / (1 - 2 gamma_{n+1}) trace(fl(A)) (no underflow), then fl(A) is positive
    definite, and so is every A with ||A - fl(A)||_2 <= formation_error once that is added to
    c. Returns inf when no finite shift exists."""
    g = gamma(n + 1)
    c = g / (1.0 - 2.0 * g) * max(float(trace), 0.0) + float(formation_error)
    c = math.nextafter(c * (1.0 + 4 * UNIT_ROUNDOFF), math.inf)
    return c if math.isfinite(c) else math.inf


def up(x: float) -> float:
    return math.nextafter(float(x), math.inf)


def mul_up(*xs: float) -> float:
    result = 1.0
    for x in xs:
        result = up(result * float(x))
    return result


def add_up(*xs: float) -> float:
    result = 0.0
    for x in xs:
        result = up(result + float(x))
    return result


def sqrt_up(x: float) -> float:
    return up(math.sqrt(float(x)))


def sum_up(values: np.ndarray) -> float:
    """Upper bound on the exact sum of nonnegative float64 values (error <= (n-1) eps sum)."""
    values = np.asarray(values, dtype=np.float64)
    s = float(np.sum(values))
    return up(s * (1.0 + (values.size + 1) * EPS))


def svd_margin(sigma: float, shape: tuple[int, ...]) -> float:
    """Cover LAPACK's backward error: computed singular values are exact for A + E with
    ||E|| <= p(m, n) eps ||A|| (Demmel, Applied Numerical Linear Algebra, Thm 5.4); we take
    p = 64 max(m, n), far above what is observed."""
    return up(float(sigma) * (1.0 + 64.0 * max(shape) * EPS))


FLOAT32_UNIT = 2.0**-24  # unit roundoff of float32
FLOAT32_ULPS_PER_NODE = 4


def float32_execution_margin(n_nodes: int) -> float:
    """Relative margin for the model as onnxruntime runs it in float32.

    onnxruntime folds parameters in float32 at load time (BatchNorm into Conv/Gemm, constant
    sub-graphs), so the weights it runs differ from the exact ONNX values by a float32
    rounding per folding. We assume at most ``FLOAT32_ULPS_PER_NODE`` ulps of relative change
    in an operator norm per ONNX node that carries or is folded into weights, compounded:
    a factor (1 + 4 * 2^-24)^n, about 1 + 2.4e-7 n. Rounding of activations at run time is additive,
    not multiplicative; certification accounts for it separately in the margins.
    """
    return up((1.0 + FLOAT32_ULPS_PER_NODE * FLOAT32_UNIT) ** max(1, n_nodes))
