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

from ..common.rounding import UNIT_ROUNDOFF as U


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
    k = torch.as_tensor(kernel, dtype=torch.float64, device=device)
    # a real kernel's blocks come in conjugate pairs K(-u) = conj K(u) with equal norms:
    # the half spectrum of rfft2 holds every distinct block
    spectrum = torch.fft.rfft2(k, s=(mh, mw))  # (C_out, C_in, M_h, M_w // 2 + 1)
    blocks = spectrum.permute(2, 3, 0, 1).reshape(-1, c_out, c_in)
    n_points = mh * mw
    fro = float(np.linalg.norm(kernel.reshape(-1)))
    err = 8.0 * math.log2(max(2, n_points)) * U * math.sqrt(n_points) * fro
    return blocks, err * (1 + 1e-6)


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


def conv_gram_bound(weight: np.ndarray, in_hw: tuple[int, int], stride: tuple[int, int],
                    pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
                    iterations: int = 10, device: str = "cpu") -> float:
    """Certified l2 bound of a zero-padded 2-D conv on an input of spatial size ``in_hw``:
    Gram iteration on the DFT blocks of the polyphase kernel at the circular size of
    :func:`circular_size`. Groups act on disjoint channels: max over groups."""
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
    bounds = gram_spectral_bounds(torch.cat(blocks_all), iterations)
    per_group = bounds.reshape(groups, -1).max(dim=1).values.cpu().numpy()
    best = max(float(per_group[g]) + errs[g] for g in range(groups))
    return math.nextafter(best, math.inf)


def dense_gram_bound(matrix: np.ndarray, iterations: int = 10, device: str = "cpu") -> float:
    a = torch.as_tensor(np.asarray(matrix, dtype=np.float64), device=device)[None]
    return math.nextafter(float(gram_spectral_bounds(a, iterations)[0]), math.inf)
