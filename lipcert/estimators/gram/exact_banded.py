"""Certified l2 norm of a zero-padded 2-D convolution itself (exact along both spatial axes),
by a Cholesky factorisation of its Gram matrix in banded form.

Where the circular embedding is loose (few positions: 10% above the exact norm on a
512-channel 3x3 conv at 4x4, 2% at 8x8) this bounds the operator W. Unroll one spatial axis
(say w) exactly: for each tap a along the other axis (h), the matrix
K_a = sum_b S_b (x) K[:, :, a, b] maps a whole input row (n_w C_in values) to a whole output
row (out_w C_out), with S_b the zero-padded, strided shift of tap b along w (exact copies of
the weights: no rounding). Then W = sum_a S_a (x) K_a along h: the operator of
:func:`.semi_circular.banded_operator_norm` with a single real "frequency", whose Gram matrix
is block-banded along h (rows p, p' interact only when |p - p'| <= (k_h - 1) d_h). Its
Cholesky factorisation by blocks of beta rows costs (rows / beta) (beta n_w C)^3 instead of
(n_h n_w C)^3, and Rump's test on it (BIT 2006, Thm 2.3) proves s I - W^T W positive
definite for s just above a Lanczos estimate (which proves nothing by itself). The axis to
keep banded and the Gram side (inputs or outputs) are chosen by that cost.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse.linalg as spla
import torch

from ...rounding import UNIT_ROUNDOFF as U
from .core import unit_exponent
from .semi_circular import _lanczos_top, _pairs, _reads, banded_operator_norm

#: Lanczos steps (float32, on the conv operator) for the estimate the certificate starts
#: from: a failed first margin costs a whole factorisation, and the steps are cheap beside
#: it (measured: 120 float64 steps converge to 1e-12 on 512-channel 3x3 convs at 4x4, 60
#: stop 2e-6 below)
LANCZOS_STEPS = 150
#: relative margins above the estimate tried in turn (the first covers float32 Lanczos)
MARGINS = (2e-6, 1e-4, 1e-2)
#: below this side the estimate is float64 Lanczos on the unrolled taps (exact for tiny
#: operators) and every margin of :mod:`.semi_circular` is tried: factorisations are cheap
SMALL_SIDE = 2048


def _axis_plan(weight_shape, in_hw, stride, pads, dilation, groups, banded_axis: int):
    c = 1 - banded_axis
    c_out, c_in_g, kh, kw = weight_shape
    k = (kh, kw)
    begin, end = (pads[0], pads[1]), (pads[2], pads[3])
    out = [(in_hw[i] + begin[i] + end[i] - (k[i] - 1) * dilation[i] - 1) // stride[i] + 1
           for i in (0, 1)]
    if min(out) < 1:
        return None
    e = banded_axis
    per_group = c_out // groups
    ch_in, ch_out = in_hw[c] * c_in_g, out[c] * per_group
    side = "input" if in_hw[e] * ch_in <= out[e] * ch_out else "output"
    reads = _reads(in_hw[e], out[e], k[e], stride[e], dilation[e], begin[e])
    pairs = _pairs(reads, side)
    n_pos, ch = (in_hw[e], ch_in) if side == "input" else (out[e], ch_out)
    width = max([0] + [r - q for r, q, _, _ in pairs])
    return {"banded_axis": e, "out": out, "side": side, "reads": reads,
            "cost": groups * banded_cost(n_pos, width, ch), "gram_side": side,
            "n_side": n_pos * ch}


def banded_cost(n_pos: int, width: int, ch: int) -> float:
    """Multiply-adds of :func:`.semi_circular.banded_cholesky_certifies` on ``n_pos``
    blocks of side ``ch`` within a band of ``width``: per block a factorisation (ch^3 / 3),
    one triangular solve (ch^3) per block below it and one product (ch^3) per update."""
    total = 0.0
    for k in range(n_pos):
        below = min(width, n_pos - 1 - k)
        # block (k, k) is updated by min(width, k) products, block (k + d, k) by
        # min(k, width - d)
        updates = min(width, k) + sum(min(k, width - d) for d in range(1, below + 1))
        total += 1 / 3 + below + updates
    return total * float(ch) ** 3


def plan(weight_shape, in_hw, stride, pads, dilation, groups) -> dict | None:
    """The cheaper orientation (by the flops of the banded factorisation), or None when the
    padded input is too small for the kernel."""
    plans = [p for axis in (0, 1) if (p := _axis_plan(weight_shape, in_hw, stride, pads,
                                                        dilation, groups, axis)) is not None]
    return min(plans, key=lambda p: (p["cost"], p["banded_axis"])) if plans else None


def unrolled_taps(weight: np.ndarray, n_c: int, out_c: int, stride_c: int, dilation_c: int,
                  pad_c: int) -> np.ndarray:
    """K_a of the module docstring for each tap a along the banded axis, shape
    (k_e, out_c C_out, n_c C_in), for ``weight`` (C_out, C_in, k_e, k_c) with the unrolled
    axis last: block (j, p) of K_a is K[:, :, a, b] where output j's tap b reads input p."""
    c_out, c_in, k_e, k_c = weight.shape
    taps = np.zeros((k_e, out_c, c_out, n_c, c_in))
    for j in range(out_c):
        for b in range(k_c):
            p = j * stride_c + b * dilation_c - pad_c
            if 0 <= p < n_c:  # distinct taps read distinct inputs: no sums, exact copies
                taps[:, j, :, p, :] = weight[:, :, :, b].transpose(2, 0, 1)
    return taps.reshape(k_e, out_c * c_out, n_c * c_in)


def tap_products(weight: np.ndarray, reads_c, n_c: int, out_c: int, side: str):
    """``product(a, a2)`` for :func:`.semi_circular._banded_gram`: K_a^T K_a2 (input side)
    or K_a K_a2^T (output side) of :func:`unrolled_taps`, assembled from the products of
    single taps K[:, :, a, b]^T K[:, :, a2, b2] (one matrix product for all of them) instead
    of multiplying the unrolled matrices (whose zero blocks a dense product pays for).
    Each entry is then a sum of the same terms as the dense product's, in another order
    (at most out_c C_out of them), so the same error bound holds (Higham, Lemma 3.5, any
    order). ``reads_c``: :func:`.semi_circular._reads` along the unrolled axis, for
    ``weight`` (C_out, C_in, k_e, k_c) with that axis last."""
    c_out, c_in, k_e, k_c = weight.shape
    w = torch.as_tensor(weight)
    if side == "input":  # columns of [K_00, K_01, ...]: blocks K_ab^T K_a2b2
        stacked = w.permute(0, 2, 3, 1).reshape(c_out, k_e * k_c * c_in)
        all_products = (stacked.T @ stacked).reshape(k_e, k_c, c_in, k_e, k_c, c_in)
        n_pos, ch = n_c, c_in
    else:  # rows of [K_00; K_01; ...]: blocks K_ab K_a2b2^T
        stacked = w.permute(2, 3, 0, 1).reshape(k_e * k_c * c_out, c_in)
        all_products = (stacked @ stacked.T).reshape(k_e, k_c, c_out, k_e, k_c, c_out)
        n_pos, ch = out_c, c_out
    # (position, position', tap b, tap b') of the unrolled axis: input side, an output j
    # reading p with b and p' with b'; output side, an input p read by j with b and j' with b'
    flat = [(int(j), b, int(q)) for b, (rows, cols) in enumerate(reads_c)
            for j, q in zip(rows, cols, strict=True)]
    blocks = [(q, q2, b, b2) if side == "input" else (j, j2, b, b2)
              for j, b, q in flat for j2, b2, q2 in flat
              if (j == j2 if side == "input" else q == q2)]

    def product(a: int, a2: int) -> torch.Tensor:
        out = torch.zeros(n_pos, ch, n_pos, ch, dtype=torch.float64)
        for r, c, b, b2 in blocks:
            out[r, :, c, :] += all_products[a, b, :, a2, b2, :]
        return out.reshape(1, n_pos * ch, n_pos * ch)

    return product


def conv_estimate(weight: np.ndarray, in_hw: tuple[int, int], stride: tuple[int, int],
                  pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
                  steps: int = LANCZOS_STEPS) -> float:
    """An estimate of lambda_max(W^T W) from below: Lanczos with full reorthogonalisation in
    float32 on the conv operator (torch conv2d and its adjoint by autograd) for a Ritz
    vector y, then the float64 Rayleigh quotient ||W y||^2 / ||y||^2, which no float32
    artefact can push above lambda_max (float32 Ritz values of a rank-deficient operator
    were seen 14% above it). Proves nothing: it only places the shift that the certificate
    then proves; 0.0 when there is nothing to estimate."""
    import torch.nn.functional as F

    t, l, b, r = pads
    shape = (1, weight.shape[1] * groups, *in_hw)
    n = int(np.prod(shape))

    def operator(dtype):
        w = torch.as_tensor(weight, dtype=dtype)
        return lambda x: F.conv2d(F.pad(x, (l, r, t, b)), w, stride=stride,
                                  dilation=dilation, groups=groups)

    forward32 = operator(torch.float32)

    def apply(v: torch.Tensor) -> torch.Tensor:
        x = v.reshape(shape).detach().requires_grad_(True)
        y = forward32(x)
        (g,) = torch.autograd.grad(y, x, y.detach())
        return g.reshape(1, n)

    # at most n / 2 steps: a float32 basis that exhausts the space loses orthogonality in
    # its last vectors (seen: the Ritz value of a 90-dim operator at 90 steps twice lambda_max)
    with torch.enable_grad():
        _, ritz = _lanczos_top(apply, n, 1, torch.float32, "cpu", min(steps, max(1, n // 2)),
                               vectors=True)
    y = ritz.to(torch.float64).reshape(shape)
    with torch.no_grad():
        image = operator(torch.float64)(y)
    norm2 = float(torch.sum(y * y))
    value = float(torch.sum(image * image)) / norm2 if norm2 > 0 else 0.0
    return value if math.isfinite(value) else 0.0


def estimated_norm(weight: np.ndarray, in_hw: tuple[int, int], stride: tuple[int, int],
                   pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
                   tol: float = 1e-4) -> float:
    """The conv's norm estimated by Lanczos (ARPACK) on W^T W applied matrix-free (torch conv
    and its adjoint by autograd), to about ``tol``: only used to decide whether the exact
    candidate is worth its Cholesky factorisation. 0.0 when ARPACK fails. The weights are
    scaled by a power of two first (their largest entry in [1, 2)): W^T W of weights near
    1e200 overflowed, and LAPACK inside ARPACK printed errors to stdout."""
    import torch.nn.functional as F

    w = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(w)) or not np.any(w):
        return 0.0
    exponent = unit_exponent(w)
    w = torch.as_tensor(np.ldexp(w, -exponent))
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
    if not len(values):
        return 0.0
    return math.ldexp(float(np.sqrt(max(float(np.max(values)), 0.0))), exponent)


def exact_banded_norm(weight: np.ndarray, in_hw: tuple[int, int], stride: tuple[int, int],
                      pads: tuple[int, int, int, int], dilation: tuple[int, int], groups: int,
                      max_cost: float, unless_within: float | None = None,
                      device: str = "cpu") -> float | None:
    """Certified upper bound on the l2 norm of a zero-padded 2-D conv, tight to about 1e-6
    (see the module docstring), or None when the factorisation would cost more than
    ``max_cost`` flops, when the estimate shows it would not go below ``unless_within`` (no
    factorisation then), or when the certificate does not go through. NaN weights: None.
    Groups act on disjoint channels: one operator each, max over them."""
    w = np.asarray(weight, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        return None
    if not np.any(w):
        return 0.0
    p = plan(w.shape, in_hw, stride, pads, dilation, groups)
    if p is None or not p["cost"] <= max_cost:
        return None
    # scale by a power of two (exact) so the largest weight is in [1, 2): no overflow and no
    # gratuitous underflow in the Gram matrix; the norm scales back exactly
    exponent = unit_exponent(w)
    w = np.ldexp(w, -exponent)
    e = p["banded_axis"]
    c = 1 - e
    if e == 1:  # the unrolled axis last
        w = w.transpose(0, 1, 3, 2)
    per_group = w.shape[0] // groups
    taps = np.stack([unrolled_taps(w[g * per_group:(g + 1) * per_group], in_hw[c],
                                   p["out"][c], stride[c], dilation[c], pads[c])
                     for g in range(groups)])
    taps_t = torch.as_tensor(taps, device=device)
    product = None
    if groups == 1:
        reads_c = _reads(in_hw[c], p["out"][c], w.shape[3], stride[c], dilation[c], pads[c])
        product = tap_products(w, reads_c, in_hw[c], p["out"][c], p["gram_side"])
    within = None if unless_within is None else math.ldexp(unless_within, -exponent)
    if p["n_side"] <= SMALL_SIDE:  # float64 Lanczos on the unrolled taps; retries are cheap
        bound = banded_operator_norm(taps_t, p["reads"], in_hw[e], p["out"][e],
                                     p["gram_side"], unless_within=within,
                                     lanczos_steps=LANCZOS_STEPS, product=product)
    else:  # the scaled weights in the original layout for the estimate
        estimate = conv_estimate(np.ldexp(np.asarray(weight, dtype=np.float64), -exponent),
                                 in_hw, stride, pads, dilation, groups)
        bound = banded_operator_norm(taps_t, p["reads"], in_hw[e], p["out"][e],
                                     p["gram_side"], unless_within=within, margins=MARGINS,
                                     product=product, estimate=estimate)
    if bound is None or bound == 0.0:
        return bound
    # entries the scaling made subnormal moved by at most 2^-1075 each; each is used at most
    # once per output position: ||dW||_2 <= ||dW||_F <= 2^-1075 sqrt(size * outputs)
    outputs = p["out"][0] * p["out"][1]
    bound = bound + math.sqrt(w.size * outputs) * 2.0**-1074
    return math.nextafter(math.ldexp(bound * (1 + 4 * U), exponent), math.inf)
