"""Certified l2 norm bound of a zero-padded 2-D convolution, exact along one spatial axis and
circular along the other (a "semi-circular" embedding).

The circular embedding of :mod:`.core` (Delattre et al., ICML 2023, Sec. 4) wraps both axes:
on few positions it is loose (measured 10% above the exact norm on a 512-channel 3x3 conv at
4x4, 2% at 8x8), and the exact operator (:mod:`.exact_conv`) costs a Cholesky factorisation
of side C n^2. In between: embed only one axis (say w) in its circular conv. The zero-padded
conv is a submatrix of that operator: the embedding argument of :func:`.core.circular_size`
acts on the w index alone, row by row of the other axis. The DFT along w (after the
polyphase permutation for the w stride) is unitary and block-diagonalises it into
frequency blocks

    T(v) = sum_a S_a (x) K_a(v),   K_a(v) = sum_b K'[:, :, a, b] exp(-2 pi i b v / M),

with S_a the zero-padded, strided shift of tap a along h (exact, no wrap-around). So
||W||_2 <= max_v ||T(v)||_2, which is exact along h: measured 5% above the exact norm at
4x4 and 0.8% at 8x8 on He-initialised 3x3 convs (512 and 256 channels).

Each T(v) is banded: positions p, p' interact only when |p - p'| <= (k_h - 1) d_h, so its
Gram matrix H(v) is block tridiagonal in groups of that many positions, and a Cholesky
factorisation by blocks (the order of evaluation of :func:`..lipsdp.banded.cholesky_runs`)
costs n (beta C)^3 instead of (n C)^3. The proof that s I - H(v) is positive definite is
Rump's test (BIT 2006, Thm 2.3) with the shift of :func:`.core.rump_certificate_shift`; the
estimate s is proposed by Lanczos on H(v) (it proves nothing: the test does).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...rounding import UNIT_ROUNDOFF as U
from ...rounding import up
from .core import (
    _fro_upper,
    _gamma,
    circular_size,
    direct_dft_error_factor,
    polyphase_kernel,
    rump_certificate_shift,
    unit_exponent,
)

#: margins tried above the Lanczos estimate, relative; a block that fails at one is tried at
#: the next (Lanczos can stop below the largest eigenvalue of a flat spectrum)
MARGINS = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
LANCZOS_STEPS = 50


def _axis_plan(weight_shape, in_hw, stride, pads, dilation, groups, exact_axis: int) -> dict:
    """Sizes of the semi-circular problem with ``exact_axis`` exact (0: h, 1: w)."""
    c = 1 - exact_axis
    c_out, c_in_g, kh, kw = weight_shape
    k = (kh, kw)
    begin, end = (pads[0], pads[1]), (pads[2], pads[3])
    n_c = circular_size(in_hw[c], begin[c], end[c], k[c], stride[c], dilation[c])
    m = n_c // stride[c]
    n_e = in_hw[exact_axis]
    k_eff = (k[exact_axis] - 1) * dilation[exact_axis] + 1
    out_e = (n_e + begin[exact_axis] + end[exact_axis] - k_eff) // stride[exact_axis] + 1
    channels_in = c_in_g * stride[c]
    per_group = c_out // groups
    in_side, out_side = n_e * channels_in, out_e * per_group
    return {"exact_axis": exact_axis, "m": m, "blocks": m // 2 + 1, "n_e": n_e, "out_e": out_e,
            "side": min(in_side, out_side), "gram_side": "input" if in_side <= out_side
            else "output"}


def plan(weight_shape, in_hw, stride, pads, dilation, groups) -> dict | None:
    """The cheaper orientation (by blocks x side^3), or None when the padded input is too
    small for the kernel on some axis."""
    plans = []
    for axis in (0, 1):
        try:
            p = _axis_plan(weight_shape, in_hw, stride, pads, dilation, groups, axis)
        except ZeroDivisionError:  # pragma: no cover - strides are >= 1
            return None
        if p["out_e"] < 1 or p["m"] < 1:
            return None
        plans.append(p)
    return min(plans, key=lambda p: (p["blocks"] * p["side"] ** 3, p["exact_axis"]))


def _tap_blocks(weight: np.ndarray, m: int, stride_c: int, dilation_c: int,
                device: str) -> tuple[torch.Tensor, int]:
    """K_a(v) for v = 0 .. m // 2 (a real kernel's other blocks are conjugates: same norms),
    shape (blocks, k_e, C_out, C_in s_c), with the circular axis last in ``weight``; and q,
    the number of polyphase taps along that axis (each entry errs by at most
    :func:`.core.direct_dft_error_factor` (q) times sum_b |K'_ab|: the direct DFT of
    :func:`.core._direct_frequency_blocks`, exact integer phases)."""
    poly = polyphase_kernel(weight, (1, stride_c), (1, dilation_c))  # (C_out, C_in s, k_e, q)
    q = poly.shape[3]
    v = np.arange(m // 2 + 1)
    phase = (np.outer(v, np.arange(q)) % m).astype(np.float64)  # exact integers
    theta = torch.as_tensor(phase, device=device) * (2.0 * math.pi / m)
    w = torch.as_tensor(poly, dtype=torch.float64, device=device)
    re = torch.einsum("vb,oiab->vaoi", torch.cos(theta), w)
    im = torch.einsum("vb,oiab->vaoi", torch.sin(theta), w)
    return torch.complex(re, -im), q


def _pairs(reads, side: str) -> list[tuple[int, int, int, int]]:
    """(row, col, tap, tap') of the Gram matrix's position blocks from :func:`_reads`:
    input side, H[p, p'] += K_t^* K_t' for each output reading p with tap t and p' with
    tap t'; output side, G[i, i'] += K_t K_t'^* for each input read by output i with tap t
    and by i' with t'."""
    flat = [(int(i), a, int(p)) for a, (rows, cols) in enumerate(reads)
            for i, p in zip(rows, cols, strict=True)]
    out = []
    for i, a, p in flat:
        for i2, a2, p2 in flat:
            if side == "input" and i == i2:
                out.append((p, p2, a, a2))
            elif side == "output" and p == p2:
                out.append((i, i2, a, a2))
    return out


def _banded_gram(taps: torch.Tensor, pairs, n_pos: int, side: str, product=None):
    """The Gram matrices H(v) in banded form: ``bands[d][k]`` is the block of positions
    (k + d, k), shape (blocks, C, C), for d = 0 .. w (the band's width: the largest
    |p - p'| that interacts); only the lower triangle is stored (H is Hermitian).
    ``product(a, a2)`` gives tap a's adjoint times tap a2 (input side) or tap a times tap
    a2's adjoint (output side); by default from the stored taps, with (a2, a) taken as the
    adjoint of (a, a2) (the same rounded numbers, transposed)."""
    nb, _, c_out, c_in = taps.shape
    ch = c_in if side == "input" else c_out
    width = max(r - c for r, c, _, _ in pairs)
    bands = [[torch.zeros(nb, ch, ch, dtype=taps.dtype, device=taps.device)
              for _ in range(n_pos - d)] for d in range(width + 1)]
    products: dict[tuple[int, int], torch.Tensor] = {}

    def get(a: int, a2: int) -> torch.Tensor:
        if (a, a2) not in products:
            if (a2, a) in products:
                return products[(a2, a)].mH
            products[(a, a2)] = product(a, a2) if product is not None else \
                taps[:, a].mH @ taps[:, a2] if side == "input" else taps[:, a] @ taps[:, a2].mH
        return products[(a, a2)]

    for r, c, a, a2 in pairs:
        if r >= c:  # the upper triangle is the Hermitian completion
            bands[r - c][c] += get(a, a2)
    return bands


def _reads(n_e: int, out_e: int, k_e: int, stride_e: int, dilation_e: int,
           pad_e: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tap a: the outputs i whose tap a reads an input inside, and that input p."""
    out = []
    for a in range(k_e):
        i = np.arange(out_e)
        p = i * stride_e + a * dilation_e - pad_e
        inside = (p >= 0) & (p < n_e)
        out.append((i[inside], p[inside]))
    return out


def _gram_operator(taps: torch.Tensor, reads, n_e: int, out_e: int, side: str):
    """x -> H(v) x for a batch of vectors (blocks, n) without forming H: T(v) and its
    adjoint from the taps, T x at output i = sum_a K_a(v) x at input p(i, a)."""
    nb, _, c_out, c_in = taps.shape
    kt = taps.transpose(-2, -1).contiguous()  # K_a^T, for row vectors
    kc = taps.conj().resolve_conj()  # (K_a^* y)^T = y^T conj(K_a)

    def t(x):  # (nb, n_e, C_in) -> (nb, out_e, C_out)
        y = torch.zeros(nb, out_e, c_out, dtype=taps.dtype, device=taps.device)
        for a, (i, p) in enumerate(reads):
            y[:, i] += x[:, p] @ kt[:, a]
        return y

    def t_adjoint(y):  # (nb, out_e, C_out) -> (nb, n_e, C_in)
        x = torch.zeros(nb, n_e, c_in, dtype=taps.dtype, device=taps.device)
        for a, (i, p) in enumerate(reads):
            x[:, p] += y[:, i] @ kc[:, a]
        return x

    if side == "input":
        return lambda v: t_adjoint(t(v.reshape(nb, n_e, c_in))).reshape(nb, -1)
    return lambda v: t(t_adjoint(v.reshape(nb, out_e, c_out))).reshape(nb, -1)


def _lanczos_top(apply, n: int, nb: int, dtype, device, steps: int,
                 vectors: bool = False):
    """Largest Ritz value of each Hermitian PSD H(v) of a batch (``apply``: x -> H x), by
    Lanczos with full reorthogonalisation: an estimate, proves nothing. With ``vectors``,
    also the Ritz vectors (batch, n), unit norm up to rounding."""
    steps = max(1, min(steps, n))
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(nb, n, dtype=torch.float64, generator=gen, device=device).to(dtype)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True)
    basis = torch.zeros(nb, n, steps, dtype=dtype, device=device)
    basis[:, :, 0] = q
    alphas, betas = [], []
    for j in range(steps):
        w = apply(basis[:, :, j])
        alpha = torch.sum(basis[:, :, j].conj() * w, dim=1).real
        alphas.append(alpha)
        stack = basis[:, :, :j + 1]
        for _ in range(2):  # full reorthogonalisation, twice
            w = w - (stack @ (stack.mH @ w[..., None]))[..., 0]
        beta = torch.linalg.vector_norm(w, dim=1)
        # breakdown (an invariant subspace: its Ritz values are eigenvalues): the rest of
        # the basis is zero, so T splits and adds zero Ritz values only (H is PSD)
        scale = torch.abs(alpha) + (betas[-1] if betas else 0.0)
        # (float32 residuals of an exhausted basis are rounding noise near 1e3 eps, not
        # below 1e-10: renormalising them gives Ritz values of no operator)
        floor = max(1e-10, 1e3 * torch.finfo(basis.real.dtype).eps)
        beta = torch.where(beta > floor * scale, beta, torch.zeros_like(beta))
        if j == steps - 1:
            break
        betas.append(beta)
        basis[:, :, j + 1] = torch.where((beta > 0)[:, None],
                                         w / torch.clamp(beta, min=1e-300)[:, None],
                                         torch.zeros_like(w))
    k = len(alphas)
    t = torch.diag_embed(torch.stack(alphas, dim=1))
    if betas:
        off = torch.stack(betas, dim=1)
        t = t + torch.diag_embed(off, offset=1) + torch.diag_embed(off, offset=-1)
    if not vectors:
        return torch.linalg.eigvalsh(t.reshape(nb, k, k))[:, -1]
    values, vecs = torch.linalg.eigh(t.reshape(nb, k, k))
    ritz = (basis[:, :, :k] @ vecs[:, :, -1:].to(dtype))[..., 0]
    return values[:, -1], ritz


def banded_cholesky_certifies(bands, s: float, error: torch.Tensor) -> torch.Tensor:
    """For each block-banded Hermitian fl(H_b) in a batch (``bands``: :func:`_banded_gram`):
    True only if lambda_max(H) < s for every H within ``error[b]`` of it in spectral norm.
    The shift and its proof are those of :func:`.core._cholesky_certifies`; the
    factorisation of B = (s - c) I - fl(H) runs by blocks within the band of width w,
    L_kk = chol(B_kk - sum_j L_kj L_kj^*), L_ik = (B_ik - sum_j L_ij L_kj^*) L_kk^-* for
    i = k + 1 .. k + w (another order of evaluating the same Cholesky recurrences; entries
    outside the band are exact zeros of B and of L: the bound of Higham, Thm 10.3, holds for
    any order, and it is all Rump's test uses). Cost: about (w + 1)(w + 2) / 2 products of
    blocks per position, instead of (positions)^2 / 3 for the dense factorisation."""
    width = len(bands) - 1
    n_pos = len(bands[0])
    n = sum(d.shape[-1] for d in bands[0])
    diagonal = torch.cat([torch.diagonal(d, dim1=-2, dim2=-1).real for d in bands[0]], dim=1)
    shift, ok = rump_certificate_shift(diagonal, n, s, error)
    factor: dict[tuple[int, int], torch.Tensor] = {}  # (i, j) -> L_ij, i - j <= width
    for k in range(n_pos):
        a = -bands[0][k]
        a.diagonal(dim1=-2, dim2=-1).add_((s - shift).to(a.dtype)[:, None])
        for j in range(max(0, k - width), k):
            a.baddbmm_(factor[(k, j)], factor[(k, j)].mH, alpha=-1)
        chol, info = torch.linalg.cholesky_ex(a)
        ok = ok & (info == 0)
        factor[(k, k)] = chol
        for i in range(k + 1, min(n_pos, k + width + 1)):
            b = -bands[i - k][k]
            for j in range(max(0, i - width), k):
                b.baddbmm_(factor[(i, j)], factor[(k, j)].mH, alpha=-1)
            # L_ik = B_ik L_kk^{-*}: solve L_kk X = B_ik^*, L_ik = X^*
            x = torch.linalg.solve_triangular(chol, b.mH, upper=False)
            below = x.mH.resolve_conj()
            parts = torch.view_as_real(below) if below.is_complex() else below
            ok = ok & torch.isfinite(parts).flatten(1).all(dim=1)
            factor[(i, k)] = below
        # later steps read L_ij only for j > k - width and never a diagonal factor
        del factor[(k, k)]
        for key in [key for key in factor if key[1] <= k - width]:
            del factor[key]
    return ok


def semi_circular_norm(weight: np.ndarray, in_hw: tuple[int, int], stride: tuple[int, int],
                       pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
                       max_side: int, unless_within: float | None = None,
                       device: str = "cpu") -> float | None:
    """Certified upper bound on the l2 norm of a zero-padded 2-D conv (see the module
    docstring), or None when a group's smaller side exceeds ``max_side``, when the
    estimate shows it would not go below ``unless_within`` (no factorisation then), or when
    the certificate does not go through. NaN weights: None."""
    w = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        return None
    if not np.any(w):
        return 0.0
    p = plan(w.shape, in_hw, stride, pads, dilation, groups)
    if p is None or p["side"] > max_side:
        return None
    # scale by a power of two (exact) so the largest weight is in [1, 2)
    exponent = unit_exponent(w)
    w = np.ldexp(w, -exponent)
    e = p["exact_axis"]
    if e == 1:  # the circular axis last
        w = w.transpose(0, 1, 3, 2)
    c = 1 - e
    per_group = w.shape[0] // groups
    tap_list, q = [], 1
    for g in range(groups):
        taps, q = _tap_blocks(w[g * per_group:(g + 1) * per_group], p["m"], stride[c],
                              dilation[c], device)
        tap_list.append(taps)
    taps = torch.cat(tap_list) if groups > 1 else tap_list[0]  # (groups * blocks, k_e, ..)
    reads = _reads(p["n_e"], p["out_e"], taps.shape[1], stride[e], dilation[e], pads[e])
    # the DFT's error in T(v): ||E||_2 <= ||E||_F <= factor sqrt(q) sqrt(out_e) ||w_g||_F
    # (each of the out_e rows uses each tap at most once), plus underflowed products
    factor = direct_dft_error_factor(q)
    fro_w = max(float(np.linalg.norm(w[g * per_group:(g + 1) * per_group].reshape(-1)))
                for g in range(groups))
    entries = p["out_e"] * taps.shape[1] * taps.shape[2] * taps.shape[3]
    dft_error = (factor * math.sqrt(q) * math.sqrt(p["out_e"]) * fro_w +
                 math.sqrt(2 * entries) * q * 2.0**-1074) * (1 + 1e-6)
    bound = banded_operator_norm(taps, reads, p["n_e"], p["out_e"], p["gram_side"],
                                 unless_within=None if unless_within is None else
                                 math.ldexp(unless_within, -exponent))
    if bound is None or bound == 0.0:
        return bound
    bound = bound + dft_error + w.size * 2.0**-1074  # + entries the scaling made subnormal
    return math.nextafter(math.ldexp(bound * (1 + 4 * U), exponent), math.inf)


def banded_operator_norm(taps: torch.Tensor, reads, n_e: int, out_e: int, side: str,
                         unless_within: float | None = None,
                         lanczos_steps: int = LANCZOS_STEPS,
                         margins: tuple[float, ...] = MARGINS, product=None,
                         estimate: float | None = None) -> float | None:
    """Certified upper bound on max_b ||T_b||_2 over a batch of operators
    T_b = sum_a S_a (x) taps[b, a], with S_a the zero-padded, strided shift of tap a along
    one axis (``reads``: :func:`_reads`), computed from the stored taps exactly as given
    (errors of forming the taps are the caller's); None when the Lanczos estimate is at
    least ``unless_within`` or the certificate does not go through; 0.0 when no tap reads an
    input. The banded Gram matrix of :func:`_banded_gram` is proven below s by
    :func:`banded_cholesky_certifies` for s just above the largest Lanczos estimate (each
    failing operator is tried again at the next margin); its formation error is
    gamma_L ||T_b||_F^2 with L the length of one entry's dot products. ``estimate``, when
    given, replaces the Lanczos estimate of max_b lambda_max(T_b^* T_b) (it proves nothing
    either way: the certificate does); ``product`` is passed to :func:`_banded_gram`."""
    pairs = _pairs(reads, side)
    if not pairs:
        return 0.0
    k_e = taps.shape[1]
    n_pos = n_e if side == "input" else out_e
    n_side = n_pos * (taps.shape[3] if side == "input" else taps.shape[2])
    if estimate is None:
        apply = _gram_operator(taps, reads, n_e, out_e, side)
        estimates = _lanczos_top(apply, n_side, taps.shape[0], taps.dtype, taps.device,
                                 lanczos_steps)
        if not bool(torch.isfinite(estimates).all()):
            return None
        estimate = float(estimates.max())
    if not math.isfinite(estimate):
        return None
    lam = max(0.0, estimate)
    if unless_within is not None and math.sqrt(lam) >= unless_within:
        return None
    bands = _banded_gram(taps, pairs, n_pos, side, product)
    # ||T||_F^2: each (output, tap) read contributes ||taps[b, a]||_F^2
    uses = np.array([len(rows) for rows, _ in reads], dtype=np.float64)
    fro_taps = _fro_upper(taps.flatten(0, 1)).reshape(taps.shape[:2]).to(torch.float64)
    fro2 = (fro_taps ** 2 * torch.as_tensor(uses, device=taps.device)).sum(dim=1) * (1 + 8 * U)
    length = (taps.shape[2] if side == "input" else taps.shape[3]) * k_e + k_e + 1
    # products that underflow err by at most the smallest subnormal each, absolutely
    underflow = n_side * length * 2.0**-1074
    error = (_gamma(length) * fro2 * (1 + 4 * U) + underflow) * (1 + 4 * U)
    top = float(torch.cat([torch.diagonal(d, dim1=-2, dim2=-1).real.flatten()
                           for d in bands[0]]).max())
    if not (math.isfinite(top) and top < 2.0**900):
        return None
    err_max = float(error.max())
    pending = torch.arange(taps.shape[0])
    s = 0.0
    for margin in margins:
        s = max(s, up(lam * (1.0 + margin) + 4.0 * err_max))
        rows = bands if len(pending) == taps.shape[0] else \
            [[b[pending] for b in band] for band in bands]
        ok = banded_cholesky_certifies(rows, s, error[pending])
        pending = pending[~ok]
        if len(pending) == 0:
            return math.nextafter(math.sqrt(s) * (1 + 4 * U), math.inf)
    return None
