"""Gram iteration (Delattre, Barthelemy, Araujo, Allauzen, ICML 2023) with explicit
float64 error control, and the circular embedding of zero-padded strided convolutions.

Gram iteration: for a matrix A, G_0 = A, G_{k+1} = G_k^* G_k gives
sigma_max(A) <= ||G_t||_F^(1 / 2^t)  (their Theorem 1), an upper bound at every t that
decreases to sigma_max. We rescale by the Frobenius norm at each step (their Algorithm 2,
there in log space) and, unlike the reference code, carry the rounding error of every
product and division as additive terms, so the printed value is a bound for the exact
matrix, not for the floating-point iterates (measured: float32 iterates dip below the
exact value after ~8 iterations).

Convolutions (Delattre et al. 2023, Sec. 4; Delattre et al. 2024 for zero padding): a
circular convolution on M x M is block-diagonalised by the 2-D DFT into M^2 blocks
K_hat(u, v) of size C_out x C_in; its norm is the max over blocks. A zero-padded conv on an
n x n input is a submatrix of the circular conv on the padded size (no wrap-around reaches
the outputs), so its norm is at most that. A stride-s conv is, after the polyphase
(space-to-depth) permutation of the padded input, a stride-1 valid conv with C_in s_h s_w
channels on ceil(Hp / s) positions: we bound that one, which is tighter than ignoring the
stride and equally sound.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...rounding import UNIT_ROUNDOFF as U
from ...rounding import rump_shift


def unit_exponent(w: np.ndarray) -> int:
    """e with the largest |entry| of a finite, nonzero ``w`` in [2^e, 2^(e+1)): scaling by
    2^-e (exact) puts it in [1, 2), away from overflow and gratuitous underflow."""
    return int(np.frexp(float(np.max(np.abs(w))))[1]) - 1


def _gamma(n: int) -> float:
    """Error constant of a length-n complex dot product (Higham, Lemma 3.5, generous)."""
    k = 8.0 * (n + 2) * U
    return k / (1.0 - k)


def _fro(x: torch.Tensor) -> torch.Tensor:
    """Frobenius norm of each matrix in a batch, as computed (no margin). On the real view
    of a complex tensor: ``matrix_norm(..., 'fro')`` on complex128 was measured 33x slower."""
    if x.is_complex():
        return torch.linalg.vector_norm(torch.view_as_real(x.resolve_conj()), dim=(-3, -2, -1))
    return torch.linalg.vector_norm(x, dim=(-2, -1))


def _margin(x: torch.Tensor) -> float:
    """Relative error bound of :func:`_fro` on x: a sum of at most 2 m n squares (each
    complex entry gives two) and a square root, (2 m n + 8) u, generous."""
    return 1.0 + (2 * x.shape[-1] * x.shape[-2] + 8) * U


def _fro_upper(x: torch.Tensor) -> torch.Tensor:
    """Upper bound on the Frobenius norm of each matrix in a batch."""
    return _fro(x) * _margin(x)


def gram_spectral_bounds(blocks: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Certified upper bounds on sigma_max of each matrix in ``blocks`` (batch, m, n).

    Works in float64/complex128. With B_k the rescaled iterates, C_{k+1} = fl(B_k^* B_k) and
    B_{k+1} = fl(C_{k+1} / r_{k+1}):
      sigma(B_k)^2 <= sigma(C_{k+1}) + gamma ||B_k||_F^2          (product error)
      sigma(C_{k+1}) <= r_{k+1} (sigma(B_{k+1}) + U ||B_{k+1}||_F)  (division error)
    and sigma(B_t) <= ||B_t||_F; the recursion is unrolled backwards. Zero blocks give 0.
    """
    dtype = torch.complex128 if blocks.is_complex() else torch.float64
    a = blocks.to(dtype)
    if a.shape[-2] < a.shape[-1]:
        a = a.mH  # same singular values; keep the Gram matrices small
    r0 = _fro(a)
    zero = r0 == 0
    r0 = torch.where(zero, torch.ones_like(r0), r0)
    b = a / r0[:, None, None]
    scales, prod_err, div_err = [], [], []
    inner = b.shape[-2]
    fb = _fro_upper(b)  # ||B_k||_F, computed once per iterate (used twice)
    d0 = U * fb
    for _ in range(iterations):
        c = b.mH @ b
        prod_err.append(_gamma(inner) * fb * fb * (1 + 4 * U))
        inner = c.shape[-2]
        r = _fro(c)
        r = torch.where(r == 0, torch.ones_like(r), r)
        b = c / r[:, None, None]
        scales.append(r)
        fb = _fro_upper(b)
        div_err.append(U * fb)
    bound = fb
    for k in reversed(range(iterations)):
        inside = scales[k] * (bound + div_err[k]) * (1 + 4 * U) + prod_err[k]
        bound = torch.sqrt(inside * (1 + 4 * U)) * (1 + 4 * U)
    result = r0 * (bound + d0) * (1 + 4 * U)
    return torch.where(zero, torch.zeros_like(result), result).real.to(torch.float64)


def polyphase_kernel(weight: np.ndarray, stride: tuple[int, int],
                     dilation: tuple[int, int]) -> np.ndarray:
    """Kernel of the stride-1 conv equivalent to a strided, dilated one after space-to-depth.

    Tap a sits at position p = a d = s q + r; output i reads polyphase component r at i + q.
    Returns K' of shape (C_out, C_in s_h s_w, Q_h, Q_w) (input channel index c s_h s_w +
    r_h s_w + r_w).
    """
    c_out, c_in, kh, kw = weight.shape
    (sh, sw), (dh, dw) = stride, dilation
    qh, qw = ((kh - 1) * dh) // sh + 1, ((kw - 1) * dw) // sw + 1
    out = np.zeros((c_out, c_in, sh, sw, qh, qw), dtype=np.float64)
    for a in range(kh):
        q_a, r_a = divmod(a * dh, sh)
        for b in range(kw):
            q_b, r_b = divmod(b * dw, sw)
            out[:, :, r_a, r_b, q_a, q_b] = weight[:, :, a, b]
    return out.reshape(c_out, c_in * sh * sw, qh, qw)


def conv_frequency_blocks(kernel: np.ndarray, size: tuple[int, int],
                          device: str = "cpu") -> tuple[torch.Tensor, float]:
    """Distinct DFT blocks (batch, C_out, C_in) of a stride-1 circular conv on ``size``, and an
    absolute bound on the FFT's rounding error in any block's spectral norm.

    FFT error (Higham, Thm 24.2, generous constant): ||fl(F x) - F x||_2 <= 8 log2(N) u
    ||F x||_2 with ||F x||_2 = sqrt(N) ||x||_2 for N = M_h M_w points; the error of one
    block is at most the total.
    """
    c_out, c_in, kh, kw = kernel.shape
    mh, mw = size
    if kh > mh or kw > mw:
        raise ValueError(f"kernel {kh}x{kw} larger than the circular size {mh}x{mw}")
    if kh * kw <= DIRECT_DFT_TAPS:
        return _direct_frequency_blocks(kernel, size, device)
    k = torch.as_tensor(kernel, dtype=torch.float64, device=device)
    # a real kernel's blocks come in conjugate pairs K(-u) = conj K(u) with equal norms:
    # the half spectrum of rfft2 holds every distinct block
    spectrum = torch.fft.rfft2(k, s=(mh, mw))  # (C_out, C_in, M_h, M_w // 2 + 1)
    blocks = spectrum.permute(2, 3, 0, 1).reshape(-1, c_out, c_in)
    n_points = mh * mw
    fro = float(np.linalg.norm(kernel.reshape(-1)))
    err = 8.0 * math.log2(max(2, n_points)) * U * math.sqrt(n_points) * fro
    return blocks, err * (1 + 1e-6)


#: kernels with at most this many taps get their DFT blocks by direct summation (a product
#: with the taps' phases: 4x faster than the FFT for 3x3 at 33x33, and a smaller error)
DIRECT_DFT_TAPS = 64


def _direct_frequency_blocks(kernel: np.ndarray, size: tuple[int, int],
                             device: str = "cpu") -> tuple[torch.Tensor, float]:
    """The blocks of :func:`conv_frequency_blocks` (same order) as K(u, v) = sum over taps
    (a, b) of w_ab exp(-2 pi i (a u / M_h + b v / M_w)), for few taps.

    Error: each phase is exp(-i theta) with theta = 2 pi m / (M_h M_w) from the exact integer
    m = (a u M_w + b v M_h) mod M_h M_w, so theta carries at most 3 roundings (|dtheta| <=
    3 u 2 pi) and cos/sin a few ulps more: |fl(p) - p| <= 64 u, generously. A block entry
    sum_t w_t p_t (two real dot products of length k) is then within
    (64 u + sqrt(2) gamma_k (1 + 64 u)) sum_t |w_t| of its value, and a block's error in
    spectral norm is at most its Frobenius norm, at most that factor times
    ||(sum_t |w_oi,t|)_oi||_F <= sqrt(k) ||w||_F (Cauchy-Schwarz)."""
    c_out, c_in, kh, kw = kernel.shape
    mh, mw = size
    half = mw // 2 + 1
    taps = kh * kw
    a = np.repeat(np.arange(kh), kw)
    b = np.tile(np.arange(kw), kh)
    u = np.repeat(np.arange(mh), half)
    v = np.tile(np.arange(half), mh)
    period = mh * mw
    m = (np.outer(u, a) * mw + np.outer(v, b) * mh) % period  # exact integers
    theta = torch.as_tensor(m, dtype=torch.float64, device=device) * (2.0 * math.pi / period)
    w = torch.as_tensor(kernel.reshape(c_out * c_in, taps).T.copy(), dtype=torch.float64,
                        device=device)  # (taps, C_out C_in)
    blocks = torch.complex(torch.cos(theta) @ w, -(torch.sin(theta) @ w))
    blocks = blocks.reshape(-1, c_out, c_in)
    fro = float(np.linalg.norm(kernel.reshape(-1)))
    factor = direct_dft_error_factor(taps)
    # products that underflow (subnormal taps) err by at most 2^-1074 each, absolutely
    underflow = taps * math.sqrt(c_out * c_in) * 2.0**-1074
    return blocks, (factor * math.sqrt(taps) * fro + underflow) * (1 + 1e-6)


def direct_dft_error_factor(taps: int) -> float:
    """Each entry of a direct DFT over ``taps`` taps (exact integer phases, cos and sin of
    the reduced angle) errs by at most this times the sum of the taps' absolute values."""
    return 64 * U + math.sqrt(2) * _gamma(taps) * (1 + 64 * U)


def circular_size(n: int, pad_begin: int, pad_end: int, kernel: int, stride: int,
                  dilation: int) -> int:
    """Smallest circular length N' (a multiple of the stride) in which the zero-padded conv
    on n inputs is a submatrix of the circular conv.

    Reads at padded positions m >= N' wrap to m - N'; both must be zero padding, which holds
    when N' >= n + max(pad_begin, pad_end). Used outputs must stay distinct rows:
    N' >= (out - 1) s + 1. The kernel must fit: N' >= k_eff.
    """
    k_eff = (kernel - 1) * dilation + 1
    out = (n + pad_begin + pad_end - k_eff) // stride + 1
    need = max(n + max(pad_begin, pad_end), k_eff, (out - 1) * stride + 1)
    return stride * (-(-need // stride))


def _batched_chunks(blocks: torch.Tensor, chunk_entries: int):
    per_block = max(1, blocks.shape[-1] * blocks.shape[-2] + min(blocks.shape[-2:]) ** 2)
    step = max(1, chunk_entries // per_block)
    for start in range(0, blocks.shape[0], step):
        yield blocks[start:start + step]


def _tall(a: torch.Tensor) -> torch.Tensor:
    """The same singular values with rows >= columns (the Gram matrix on the smaller side)."""
    return a.mH if a.shape[-2] < a.shape[-1] else a


def _rayleigh_estimates(h: torch.Tensor, steps: int = 12, width: int = 3) -> torch.Tensor:
    """Power-iteration Rayleigh quotients (``width`` random starts, ``steps`` products, no
    orthogonalisation: batched products only) of each Hermitian PSD matrix in a batch: lower
    estimates of lambda_max, used only to choose the shift the certificate then proves."""
    p = min(width, h.shape[-1])
    gen = torch.Generator(device=h.device).manual_seed(0)
    x = torch.randn(h.shape[0], h.shape[-1], p, dtype=torch.float64, device=h.device,
                    generator=gen).to(h.dtype)
    for _ in range(steps):
        x = h @ x
        x = x / torch.clamp(torch.linalg.vector_norm(x, dim=1, keepdim=True), min=1e-300)
    quotients = torch.sum(x.conj() * (h @ x), dim=1).real  # x normalised per column
    return quotients.max(dim=-1).values.to(torch.float64)


def rump_certificate_shift(diag: torch.Tensor, n: int, s: float,
                           error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The shift c_b of :func:`_cholesky_certifies` for each matrix of a batch, from the
    real parts of its computed diagonal ``diag`` (batch, n), and whether c_b < s."""
    # trace(B) <= n s plus whatever a (rounding-)negative computed diagonal adds
    negative = torch.clamp(-diag.min(dim=-1).values, min=0.0)
    top = diag.max(dim=-1).values
    trace = (n * s + n * negative) * (1 + 4 * U) + n * 2 * U * (s + top)
    rho = rump_shift(4 * (n + 2), 1.0)  # rho * trace, for a unit trace
    shift = rho * trace * (1 + 4 * U) + (error + 2 * U * (s + top)) * (1 + 8 * U)
    shift = shift * (1 + 1e-9)
    return shift, shift < s


def _cholesky_certifies(h: torch.Tensor, s: float, error: torch.Tensor) -> torch.Tensor:
    """For each Hermitian fl(H_b) in a batch: True only if lambda_max(H) < s for every H
    within ``error[b]`` of it in spectral norm.

    B_b = (s - c_b) I - fl(H_b) is factored by LAPACK's complex Cholesky. Its error bound
    L L^* = B + dB, |dB| <= gamma |L| |L^*| (Higham, Thm 10.3) holds in complex arithmetic
    with gamma_{n+1} replaced by sqrt(2) gamma_{n+2} (complex inner products, Higham,
    Lemma 3.5); we take gamma_{4(n+2)}, larger. As in Rump's test (BIT 2006, Thm 2.3) this
    gives lambda_min(B) >= -rho trace(B) when the factorisation runs, and
    trace(B) <= n s + n max(0, -min_i fl(H)_ii) (plus the diagonal's rounding). With the
    diagonal rounded once (LAPACK reads its real part and one triangle: the Hermitian
    completion, within the same entrywise bound of H),
    s I - H = B + (fl(H) - H) + D, D_ii >= c_b - u (s + fl(H)_ii), so
    c_b = rho n s + error_b + 2 u (s + max_i fl(H_b)_ii) suffices (inflated for its own
    arithmetic)."""
    n = h.shape[-1]
    shift, ok = rump_certificate_shift(torch.diagonal(h, dim1=-2, dim2=-1).real, n, s, error)
    b = -h
    b.diagonal(dim1=-2, dim2=-1).add_((s - shift).to(h.dtype)[:, None])
    _, info = torch.linalg.cholesky_ex(b)
    return ok & (info == 0)


def _times_power_of_two(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """x * 2^exponent in steps that stay in range (2.0 ** 1074 overflows a float): exact
    for entries that stay normal."""
    while exponent > 1000:
        x, exponent = x * 2.0**1000, exponent - 1000
    while exponent < -1000:
        x, exponent = x * 2.0**-1000, exponent + 1000
    return x * 2.0**exponent


def certified_block_max(blocks: torch.Tensor, chunk_entries: int = 1 << 24,
                        refine: int = 2) -> float:
    """A certified upper bound on max_b sigma_max(A_b) over a batch of matrices (real or
    complex, as stored): about 2x faster than LAPACK's eigenvalues of every block, and tight
    to about 1e-9 relative.

    With H_b = A_b^* A_b on the smaller side (|fl(H_b) - H_b| <= gamma_m |A_b|^* |A_b|, so
    an error of at most gamma_m ||A_b||_F^2 in spectral norm, Higham, Lemma 3.5):
    1. lower estimates of lambda_max(H_b) by power iteration, batched;
    2. the ``refine`` blocks with the largest estimates get LAPACK's eigenvalues; the largest
       eigenvalue met, times (1 + margin), is the candidate s;
    3. every block is proven below s by :func:`_cholesky_certifies`; the blocks that fail get
       their own eigenvalues, s grows to cover them, and only they are checked again (the
       others are proven below the smaller s). Returns sqrt(s) rounded up; NaN for
       non-finite blocks.
    The error bounds above assume no overflow and that the largest entries do not underflow:
    when the Gram matrices' largest diagonal entry (the largest squared column norm) is
    outside [2^-900, 2^900] (or not finite), the blocks are scaled by a power of two
    (exact) so that the largest entry is near 1, and the work is done again on them."""
    dtype = torch.complex128 if blocks.is_complex() else torch.float64
    blocks = blocks.to(dtype).resolve_conj()
    if blocks.numel() == 0:
        return 0.0
    value = _certified_scaled_max(blocks, chunk_entries, refine)
    if value is not None:  # in range as given: no scaling pass
        return math.nextafter(value, math.inf) if value == value else math.nan
    parts = torch.view_as_real(blocks) if blocks.is_complex() else blocks
    # max |re|, |im| is within sqrt(2) of the largest modulus: enough to choose the scale;
    # NaN propagates through max and inf stays inf, so this also finds non-finite blocks
    largest = float(parts.abs().max())
    if not math.isfinite(largest):
        return math.nan
    if largest == 0.0:
        return 0.0
    exponent = math.frexp(largest)[1]
    blocks = _times_power_of_two(blocks, -exponent)
    value = _certified_scaled_max(blocks, chunk_entries, refine)
    if value is None:  # pragma: no cover - the largest entry is near 1 after scaling
        return math.nan
    scaled = math.ldexp(value, exponent) if value == value else math.nan
    return math.nextafter(scaled, math.inf) if scaled == scaled else math.nan


def _certified_scaled_max(blocks: torch.Tensor, chunk_entries: int,
                          refine: int) -> float | None:
    """The certified max of :func:`certified_block_max` for blocks in range; None when the
    largest squared column norm is outside [2^-900, 2^900] or not finite (scale first)."""
    grams, errors, estimates = [], [], []
    for chunk in _batched_chunks(blocks, chunk_entries):
        a = _tall(chunk)
        h = a.mH @ a
        fro_a = _fro_upper(a).to(torch.float64)
        grams.append(h)
        errors.append(_gamma(a.shape[-2]) * fro_a * fro_a * (1 + 4 * U))
        estimates.append(_rayleigh_estimates(h))
    h_all = torch.cat(grams) if len(grams) > 1 else grams[0]  # one chunk: no copy
    del grams
    top = float(torch.diagonal(h_all, dim1=-2, dim2=-1).real.max())
    if not 2.0**-900 < top < 2.0**900:  # NaN too
        return None
    error = torch.cat(errors)
    est = torch.cat(estimates)
    if not bool(torch.isfinite(est).all()):
        return math.nan
    n = h_all.shape[-1]

    def exact_top(indices: torch.Tensor) -> float:
        try:
            return float(torch.linalg.eigvalsh(h_all[indices])[..., -1].max())
        except RuntimeError:  # LAPACK did not converge: no estimate, no certificate
            return math.nan

    order = torch.argsort(est, descending=True)
    lam = exact_top(order[:refine])
    if not math.isfinite(lam):
        return math.nan
    lam = max(0.0, lam)
    err_max = float(error.max())
    # the certificate's own shift relative to s is about 4 (n + 2) u n + error / s
    margin = 4.0 * (4 * (n + 2) * U * n) + 1e-12
    s = (lam + 4.0 * err_max) * (1.0 + margin) + 1e-300
    pending = torch.arange(h_all.shape[0])
    step = max(1, chunk_entries // max(1, n * n))
    for _ in range(64):
        failed = []
        for start in range(0, len(pending), step):
            idx = pending[start:start + step]
            ok = _cholesky_certifies(h_all[idx], s, error[idx])
            failed.append(idx[~ok])
        failed = torch.cat(failed)
        if len(failed) == 0:
            return math.nextafter(math.sqrt(s) * (1 + 4 * U), math.inf)
        worst = exact_top(failed)
        if not math.isfinite(worst):
            return math.nan
        lam = max(lam, worst)
        margin *= 10
        s = max(s, (lam + 4.0 * err_max) * (1.0 + margin))
        pending = failed
        if not math.isfinite(s):
            return math.nan
    return math.nan


SPECTRAL = ("eigh", "gram")


def conv_circular_bound(weight: np.ndarray, in_hw: tuple[int, int], stride: tuple[int, int],
                        pads: tuple[int, int, int, int], dilation: tuple[int, int],
                        groups: int, iterations: int = 10, device: str = "cpu",
                        spectral: str = "eigh") -> float:
    """Certified l2 bound of a zero-padded 2-D conv on an input of spatial size ``in_hw``:
    the norm of the circular embedding of :func:`circular_size`, from the DFT blocks of the
    polyphase kernel: their largest norm certified by Cholesky (:func:`certified_block_max`,
    ``spectral="eigh"``), or each block bounded by Gram iteration
    (:func:`gram_spectral_bounds`, ``spectral="gram"``). Groups act on disjoint channels:
    max over groups. NaN for non-finite weights.

    The kernel is first scaled by a power of two so that its largest entry lies in [1, 2):
    the FFT's error bound is relative and holds only without underflow or overflow. Entries
    that the scaling pushes below the normal range move by at most 2^-1075 each, which adds
    at most (number of entries) 2^-1075 to any block's norm."""
    if spectral not in SPECTRAL:
        raise ValueError(f"spectral must be one of {SPECTRAL}, got {spectral!r}")
    w = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        return math.nan
    if not np.any(w):
        return 0.0
    exponent = unit_exponent(w)
    value = _scaled_circular_bound(np.ldexp(w, -exponent), in_hw, stride, pads, dilation,
                                   groups, iterations, device, spectral)
    if value != value:
        return math.nan
    value = value + w.size * 2.0**-1074
    return math.nextafter(math.ldexp(value, exponent), math.inf)


def _scaled_circular_bound(weight, in_hw, stride, pads, dilation, groups, iterations, device,
                           spectral) -> float:
    t, l, b, r = pads
    kh, kw = weight.shape[2:]
    nh = circular_size(in_hw[0], t, b, kh, stride[0], dilation[0])
    nw = circular_size(in_hw[1], l, r, kw, stride[1], dilation[1])
    size = (nh // stride[0], nw // stride[1])
    c_out = weight.shape[0]
    blocks_all, errs = [], []
    for g in range(groups):
        wg = weight[g * (c_out // groups):(g + 1) * (c_out // groups)]
        blocks, err = conv_frequency_blocks(polyphase_kernel(wg, stride, dilation), size, device)
        blocks_all.append(blocks)
        errs.append(err)
    if spectral == "eigh":
        # one certificate for all groups' blocks: the max over them is what is bounded
        value = certified_block_max(blocks_all[0] if groups == 1 else torch.cat(blocks_all))
        return math.nextafter(value + max(errs), math.inf) if value == value else math.nan
    bounds = gram_spectral_bounds(torch.cat(blocks_all), iterations)
    per_group = bounds.reshape(groups, -1).max(dim=1).values.cpu().numpy()
    if np.isnan(per_group).any():
        return math.nan
    best = max(float(per_group[g]) + errs[g] for g in range(groups))
    return math.nextafter(best, math.inf)


def dense_gram_bound(matrix: np.ndarray, iterations: int = 10, device: str = "cpu") -> float:
    a = torch.as_tensor(np.asarray(matrix, dtype=np.float64), device=device)[None]
    return math.nextafter(float(gram_spectral_bounds(a, iterations)[0]), math.inf)
