"""Certified, tight l2 norm of a zero-padded 2-D convolution on a small input.

Where the circular embedding is loosest (few spatial positions: measured 10% above the exact
norm on a 512-channel 3x3 conv at 4x4, 2% at 8x8), this bounds the operator itself:
1. the Gram matrix H of its smaller side (W^T W on the inputs or W W^T on the outputs),
   assembled from the kernel's tap products K_a^T K_b (or K_a K_b^T) without unrolling W;
2. an estimate lambda of lambda_max(H) by Lanczos (ARPACK), which proves nothing;
3. a proof that s I - H is positive definite for s slightly above lambda: the floating-point
   Cholesky factorisation of s I - fl(H) minus Rump's shift (BIT 2006, Thm 2.3) runs, with the
   formation error of fl(H) in the shift. Then ||W||_2 = sqrt(lambda_max(H)) < sqrt(s).
Cost: the Cholesky factorisation, (min side)^3 / 3 flops; the estimator gates it by size.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg as sla
import scipy.sparse.linalg as spla

from ..common.rounding import gamma, rump_shift, sqrt_up, up

#: the first relative margin above the Lanczos estimate is FIRST_MARGIN_ROUNDINGS times the
#: relative size of Rump's shift (about n^2 u); then MARGIN_GROWTH times more, up to MAX_MARGIN
FIRST_MARGIN_ROUNDINGS = 8
MARGIN_GROWTH = 100.0
MAX_MARGIN = 1e-2
DENSE_EIGEN_SIDE = 600  # below this, LAPACK's eigvalsh is cheaper than Lanczos


def conv_incidence(in_hw, out_hw, kernel_hw, stride, pads, dilation) -> np.ndarray:
    """(output positions, taps) array: the flat input position that tap (a, b) of output
    (i, j) reads, or -1 where it reads zero padding. Taps are numbered a * k_w + b."""
    (nh, nw), (oh, ow), (kh, kw) = in_hw, out_hw, kernel_hw
    i = np.arange(oh)[:, None] * stride[0] + np.arange(kh)[None, :] * dilation[0] - pads[0]
    j = np.arange(ow)[:, None] * stride[1] + np.arange(kw)[None, :] * dilation[1] - pads[1]
    rows = i[:, None, :, None]  # (oh, 1, kh, 1)
    cols = j[None, :, None, :]  # (1, ow, 1, kw)
    inside = (rows >= 0) & (rows < nh) & (cols >= 0) & (cols < nw)
    flat = np.where(inside, rows * nw + cols, -1)
    return flat.reshape(oh * ow, kh * kw)


def _transpose_incidence(incidence: np.ndarray, n_inputs: int) -> np.ndarray:
    """(input positions, taps): the output whose tap t reads input p, or -1. Unique: a tap
    offset fixes the output from the input."""
    out = np.full((n_inputs, incidence.shape[1]), -1, dtype=np.int64)
    q, t = np.nonzero(incidence >= 0)
    out[incidence[q, t], t] = q
    return out


def gram_matrix(weight: np.ndarray, incidence: np.ndarray, n_inputs: int,
                side: str) -> tuple[np.ndarray, float]:
    """fl(W^T W) (side "input") or fl(W W^T) (side "output") of the conv given by ``weight``
    (C_out, C_in, k_h, k_w) and ``incidence`` (:func:`conv_incidence`), ordered (position,
    channel), and a bound on its formation error in spectral norm.

    Input side: H[p, p'] = sum over outputs q with taps t, t' reading p, p' of K_t^T K_t'.
    For fixed (t, t') each q gives one (p, p') pair and distinct q distinct pairs, so one
    vectorised update per tap pair adds every term once. Every entry of H is a dot product of
    length at most C_out * taps computed in some order, so |fl(H) - H| <= gamma |W|^T |W|
    (Higham, Lemma 3.5, any order), whose spectral norm is at most ||W||_F^2."""
    c_out, c_in, kh, kw = weight.shape
    taps = weight.reshape(c_out, c_in, kh * kw).transpose(2, 0, 1)  # (taps, C_out, C_in)
    if side == "input":
        groups, channels, inner = incidence, c_in, c_out
        stacked = taps.transpose(1, 0, 2).reshape(c_out, -1)  # [K_0, K_1, ...]
        products = stacked.T @ stacked  # (taps C_in)^2: blocks K_t^T K_t'
    else:
        groups, channels, inner = _transpose_incidence(incidence, n_inputs), c_out, c_in
        stacked = taps.reshape(-1, c_in)  # [K_0; K_1; ...]
        products = stacked @ stacked.T  # (taps C_out)^2: blocks K_t K_t'^T
    k = kh * kw
    products = products.reshape(k, channels, k, channels)
    n_pos = n_inputs if side == "input" else incidence.shape[0]
    h = np.zeros((n_pos, channels, n_pos, channels))
    for t in range(k):
        for u in range(k):
            both = (groups[:, t] >= 0) & (groups[:, u] >= 0)
            if both.any():
                h[groups[both, t], :, groups[both, u], :] += products[t, :, u, :]
    counts = np.count_nonzero(incidence >= 0, axis=0)  # uses of each tap
    fro2 = float(np.sum(counts * np.sum(taps * taps, axis=(1, 2))))
    side_n = n_pos * channels
    # underflow: each operation errs by at most the smallest subnormal, absolutely
    underflow = side_n * (inner * k + k + 1) * float(np.finfo(np.float64).smallest_subnormal)
    error = up(gamma(inner * k + k + 1) * fro2 * (1.0 + 1e-12) + underflow)
    return h.reshape(side_n, side_n), error


def _top_eigenvalue(h: np.ndarray) -> float | None:
    """An estimate of lambda_max(h) (proves nothing), or None."""
    n = h.shape[0]
    if n <= DENSE_EIGEN_SIDE:
        return float(sla.eigvalsh(h, subset_by_index=[n - 1, n - 1], check_finite=False)[-1])
    try:
        values = spla.eigsh(h, k=1, which="LA", tol=1e-10, ncv=min(n - 1, 40),
                            maxiter=50 * n, return_eigenvectors=False)
    except spla.ArpackNoConvergence as failed:
        values = failed.eigenvalues
    except (spla.ArpackError, ValueError):
        return None
    return float(np.max(values)) if len(values) else None


def margins(n: int) -> list[float]:
    """Relative margins tried in turn: the first just above Rump's shift relative to s
    (trace(s I - H) <= n s, so the shift is about (n + 1) u n s)."""
    m = max(1e-10, FIRST_MARGIN_ROUNDINGS * (n + 1) * n * np.finfo(np.float64).eps / 2)
    out = []
    while m < MAX_MARGIN:
        out.append(m)
        m *= MARGIN_GROWTH
    return out + [MAX_MARGIN]


def estimated_norm(weight: np.ndarray, in_hw: tuple[int, int], stride: tuple[int, int],
                   pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
                   tol: float = 1e-4) -> float:
    """The conv's norm estimated by Lanczos (ARPACK) on W^T W applied matrix-free (torch conv
    and its adjoint by autograd), to about ``tol``: only used to decide whether the exact
    candidate is worth its Cholesky factorisation. 0.0 when ARPACK fails."""
    import torch
    import torch.nn.functional as F

    w = torch.as_tensor(np.asarray(weight, dtype=np.float64))
    t, l, b, r = pads
    shape = (1, w.shape[1] * groups, *in_hw)
    n = int(np.prod(shape))

    def gram(v: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(np.asarray(v, dtype=np.float64).reshape(shape)).requires_grad_(True)
        y = F.conv2d(F.pad(x, (l, r, t, b)), w, stride=stride, dilation=dilation,
                     groups=groups)
        (g,) = torch.autograd.grad(y, x, y.detach())
        return g.reshape(-1).numpy()

    if n < 3:
        return 0.0
    op = spla.LinearOperator((n, n), matvec=gram, dtype=np.float64)
    try:
        values = spla.eigsh(op, k=1, which="LA", tol=tol, ncv=min(n - 1, 20),
                            maxiter=20 * n, return_eigenvectors=False,
                            v0=np.random.default_rng(0).standard_normal(n))
    except spla.ArpackNoConvergence as failed:
        values = failed.eigenvalues
    except (spla.ArpackError, ValueError):
        return 0.0
    return float(np.sqrt(max(float(np.max(values)), 0.0))) if len(values) else 0.0


def certify_below(h: np.ndarray, error: float, estimate: float) -> float | None:
    """The smallest s among ``estimate`` (1 + m), m in :func:`margins`, proven to exceed
    lambda_max of every symmetric H with ||H - h||_2 <= ``error``, or None. Overwrites h.

    With B the stored matrix fl(s - c + (-h_ii)) on the diagonal and -h off it: if the
    floating-point Cholesky factorisation of B runs, lambda_min(B) > -rho trace(B) (Rump,
    BIT 2006, Thm 2.3; rho from :func:`~..common.rounding.rump_shift`), and
    s I - H = B + (h - H) + D with D diagonal, D_ii >= c - u (s + |B_ii|) (the roundings
    of s - c and of each diagonal entry). So s I - H is positive definite once
    c > rho trace(B) + error + u (s + max |B_ii|), which is checked on the stored B before
    it is factored (only its lower triangle is read: the symmetric completion, within the
    same entrywise bound of H)."""
    n = h.shape[0]
    u = np.finfo(np.float64).eps / 2
    base = max(estimate, 0.0) + 4.0 * error
    np.negative(h, out=h)
    minus_diag = h.flat[::n + 1].copy()  # -fl(H)_ii
    for margin in margins(n):
        s = up(base * (1.0 + margin) + np.finfo(np.float64).tiny)
        first = rump_shift(n, n * s + float(np.sum(minus_diag)), error)
        shift = up(first * (1.0 + 1e-9) + 4.0 * u * (s + float(np.max(np.abs(minus_diag)))))
        if not shift < s:
            continue
        h.flat[::n + 1] = minus_diag + (s - shift)
        stored = h.flat[::n + 1]
        trace_up = up(float(np.sum(np.abs(stored))) * (1.0 + (n + 1) * 2 * u))
        needed = rump_shift(n, trace_up, up(error + u * (s + float(np.max(np.abs(stored))))))
        if not shift > needed:
            continue
        try:
            sla.cholesky(h, lower=True, overwrite_a=False, check_finite=True)
        except (np.linalg.LinAlgError, sla.LinAlgError, ValueError):
            continue
        return s
    return None


def fits(weight_shape: tuple[int, ...], in_hw: tuple[int, int], out_hw: tuple[int, int],
         groups: int, max_side: int) -> bool:
    """Whether :func:`exact_conv_norm` runs for this conv: each group's smaller side is at
    most ``max_side``, and so are all groups' Gram matrices together (in entries, squared)."""
    per_group = weight_shape[0] // groups
    side = min(weight_shape[1] * in_hw[0] * in_hw[1], per_group * out_hw[0] * out_hw[1])
    return side <= max_side and groups * side ** 2 <= max_side ** 2


def exact_conv_norm(weight: np.ndarray, in_hw: tuple[int, int], out_hw: tuple[int, int],
                    stride: tuple[int, int], pads: tuple[int, int, int, int],
                    dilation: tuple[int, int], groups: int, max_side: int,
                    unless_within: float | None = None) -> float | None:
    """Certified upper bound on the l2 norm of a zero-padded 2-D convolution (tight: within
    about 1e-6 of the exact value), or None when a group's smaller side exceeds ``max_side``,
    when every group's estimated norm is at least ``unless_within`` (a bound already known
    that this would not beat: the Cholesky factorisations are skipped), or when the
    certificate does not go through. Groups act on disjoint channels: max over them."""
    w = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        return None
    if not np.any(w):
        return 0.0
    # scale by a power of two (exact) so the largest weight is in [1, 2): no overflow and
    # no gratuitous underflow in the Gram matrix; the norm scales back exactly
    exponent = int(np.frexp(float(np.max(np.abs(w))))[1]) - 1
    w = np.ldexp(w, -exponent)
    c_out, c_in_g = w.shape[:2]
    incidence = conv_incidence(in_hw, out_hw, w.shape[2:], stride, pads, dilation)
    n_in = in_hw[0] * in_hw[1]
    per_group = c_out // groups
    if not fits(w.shape, in_hw, out_hw, groups, max_side):
        return None
    side = "input" if c_in_g * n_in <= per_group * out_hw[0] * out_hw[1] else "output"
    problems = []
    for g in range(groups):
        wg = w[g * per_group:(g + 1) * per_group]
        if not np.any(wg):
            continue
        h, error = gram_matrix(wg, incidence, n_in, side)
        if not (np.all(np.isfinite(h)) and math.isfinite(error)):
            return None
        estimate = _top_eigenvalue(h)
        if estimate is None or not math.isfinite(estimate):
            return None
        problems.append((h, error, estimate))
    if unless_within is not None and problems and \
            math.ldexp(math.sqrt(max(max(p[2] for p in problems), 0.0)), exponent) >= \
            unless_within:
        return None
    best = 0.0
    for h, error, estimate in problems:
        s = certify_below(h, error, estimate)
        if s is None:
            return None
        best = max(best, sqrt_up(s))
    scaled = math.ldexp(best, exponent)  # exact unless it overflows (inf) or underflows
    return up(scaled) if scaled > 0 or best == 0 else float(np.finfo(np.float64).tiny)
