"""Sound per-layer operator norms (upper bounds), each rounded upwards.

These are the per-layer norm facts (docs/ARCHITECTURE.md, "Estimators"); estimators compose them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...ir import evaluate
from ...ir import ops as O
from ...rounding import EPS, sqrt_up, svd_margin, up

DENSE_SVD_LIMIT = 4096  # exact SVD when the smaller side is at most this


def spectral_norm(matrix: np.ndarray) -> float:
    """Largest singular value in float64, rounded up to cover LAPACK's error."""
    a = np.asarray(matrix, dtype=np.float64)
    if a.size == 0 or not np.any(a):
        return 0.0
    if min(a.shape) <= DENSE_SVD_LIMIT:
        sigma = float(np.linalg.svd(a, compute_uv=False)[0])
        return svd_margin(sigma, a.shape)
    # Gram matrix of the smaller side: forming it errs by <= gamma_n ||A||_F^2 (Higham, 3.5)
    small = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    lam = float(np.linalg.eigvalsh(small)[-1])
    err = 2.0 * max(a.shape) * EPS * float(np.sum(a * a))
    return sqrt_up(svd_margin(lam, small.shape) + up(err))


def max_row_abs_sum(matrix: np.ndarray) -> float:
    """linf -> linf operator norm of a matrix (max row abs sum), rounded up."""
    a = np.abs(np.asarray(matrix, dtype=np.float64))
    if a.size == 0:
        return 0.0
    rows = a.reshape(a.shape[0], -1)
    # each computed row sum is within (n-1) eps of the exact one (Higham, Lemma 3.1)
    return up(float(rows.sum(axis=1).max()) * (1.0 + (rows.shape[1] + 1) * EPS))


def _overlap(kernel: int, stride: int, dilation: int) -> int:
    """How many (output position, kernel tap) pairs can read one input position, per axis."""
    k_eff = (kernel - 1) * dilation + 1
    return max(1, min(kernel, -(-k_eff // stride)))


def conv_l2_cheap(weight: np.ndarray, stride, dilation, groups: int) -> tuple[float, str]:
    """Size-independent l2 bound of a zero-padded 2-D convolution (also of its transpose).

    Two sound bounds, the smaller is returned:
    - reshaped kernel: ||y||^2 = sum_p ||R patch_p||^2 <= ||R||^2 * m * ||x||^2 where R is
      the (C_out/g) x (C_in/g kh kw) reshaped kernel of a group and m the number of windows
      that contain an input pixel (m <= kh kw; with stride s, <= ceil(k_eff/s) per axis);
    - taps: y = sum_ab K_ab S_ab x with S_ab a partial permutation, so ||y|| <= sum ||K_ab||.
    Groups act on disjoint channels: the norm is the max over groups.
    """
    w = np.asarray(weight, dtype=np.float64)
    c_out, c_in_g, kh, kw = w.shape
    m = _overlap(kh, stride[0], dilation[0]) * _overlap(kw, stride[1], dilation[1])
    reshaped, taps = 0.0, 0.0
    for g in range(groups):
        wg = w[g * (c_out // groups):(g + 1) * (c_out // groups)]
        reshaped = max(reshaped, spectral_norm(wg.reshape(wg.shape[0], -1)))
        tap_sum = 0.0
        for a in range(kh):
            for b in range(kw):
                tap_sum = up(tap_sum + spectral_norm(wg[:, :, a, b]))
        taps = max(taps, tap_sum)
    reshaped = up(reshaped * math.sqrt(m) * (1 + 2 * EPS))
    if reshaped <= taps:
        return reshaped, f"sqrt({m}) * ||reshaped kernel||"
    return taps, "sum of per-tap norms"


def conv_linf(weight: np.ndarray) -> float:
    """linf norm of a convolution: max over output channels of sum |K[o]| ."""
    return max_row_abs_sum(np.asarray(weight).reshape(weight.shape[0], -1))


def conv_transpose_linf(op: O.ConvTranspose) -> float:
    """Max row sum of a transposed convolution: an output pixel receives only the taps of one
    stride phase (a d = r mod s per axis), so the sum runs over one phase class."""
    w = np.abs(np.asarray(op.weight, dtype=np.float64))  # (C_in, C_out/g, kh, kw)
    c_in, c_out_g, kh, kw = w.shape
    best = 0.0
    for g in range(op.groups):
        wg = w[g * (c_in // op.groups):(g + 1) * (c_in // op.groups)]
        for rh in range(op.stride[0]):
            for rw in range(op.stride[1]):
                ah = [a for a in range(kh) if (a * op.dilation[0]) % op.stride[0] == rh]
                aw = [b for b in range(kw) if (b * op.dilation[1]) % op.stride[1] == rw]
                if not ah or not aw:
                    continue
                block = wg[:, :, ah][:, :, :, aw]  # (C_in/g, C_out/g, |ah|, |aw|)
                per_out = np.moveaxis(block, 1, 0).reshape(c_out_g, -1)
                best = max(best, max_row_abs_sum(per_out))
    return best


def max_pool_l2(op: O.MaxPool) -> float:
    """sqrt of the number of windows that can contain one pixel: the Clarke
    Jacobian has unit rows, and a column has at most that many nonzeros."""
    m = _overlap(op.kernel[0], op.stride[0], op.dilation[0]) * \
        _overlap(op.kernel[1], op.stride[1], op.dilation[1])
    return sqrt_up(m)


def nonnegative_linear_norms(op: O.Op, in_shape: tuple[int, ...]) -> tuple[float, float]:
    """(l2, linf) bounds of a linear map with a nonnegative matrix A (pooling).

    linf = max row sum = max(A 1); l2 <= sqrt(max row sum * max column sum) (Schur test),
    with column sums A^T 1 from autograd. Exact for non-overlapping average pooling.
    """
    x = torch.ones(in_shape, dtype=torch.float64, requires_grad=True)
    y = evaluate.apply(op, x)
    rows = float(y.detach().max())
    (cols,) = torch.autograd.grad(y.sum(), x)
    col = float(cols.max())
    n = int(np.prod(in_shape))
    rows_up = up(rows * (1 + (n + 2) * EPS))
    col_up = up(col * (1 + (n + 2) * EPS))
    return sqrt_up(up(rows_up * col_up)), rows_up


def scale_norm(op: O.Scale) -> float:
    return float(np.max(np.abs(op.scale)))
