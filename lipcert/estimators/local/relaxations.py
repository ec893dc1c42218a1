"""Linear relaxations of elementwise activations on an interval, with Clarke derivative sets.

For sigma on [l, u] (per neuron, batched over domains) we return lines
    sl * z + il <= sigma(z) <= su * z + iu,
output bounds [bl, bu] and the interval [dl, du] that contains Clarke's generalised
derivative of sigma at every point of [l, u].

Piecewise-linear activations (ReLU, LeakyReLU, Clip with one kink inside [l, u]) are
"two-piece": value v at the kink kappa, slope p left of it and q right of it. The convex
case takes the chord above and a line through the kink below (slope q if the interval lies
mostly right of the kink, else p), as CROWN does (Zhang et al., NeurIPS 2018, Sec. 3.2);
the concave case mirrors it. Smooth activations (Sigmoid, Tanh, Softplus, GELU, SiLU) and
ELU use the mean-value lines sigma(l) + [dmin, dmax] (z - l) and
sigma(u) - [dmin, dmax] (u - z), whichever is tighter at the midpoint, with [dmin, dmax]
their derivative's range on [l, u]: sound for monotone and non-monotone ones alike, looser
than tangent/chord pairs.

Lines and bounds are widened by ``SLACK`` relative to the interval's own scale for the few
elementwise operations that build them; the sums that produce the intervals are padded by
the DAG's slack times their terms' magnitude (docs/ARCHITECTURE.md, "Rounding").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...ir import ops as O
from ...soundness import checked_array, poison

SLACK = 1e-12
BRANCHABLE = (O.Relu, O.LeakyRelu)


@dataclass
class Relaxation:
    sl: torch.Tensor
    il: torch.Tensor
    su: torch.Tensor
    iu: torch.Tensor
    bl: torch.Tensor
    bu: torch.Tensor
    dl: torch.Tensor
    du: torch.Tensor
    mixed: torch.Tensor  # bool: a kink lies inside (l, u) and no split decided it
    # SLACK times the magnitude scale of the interval: a line through the kink with slope s
    # gets the pad (1 + |su| + |s|) * unit_pad, as relax() pads its own (set by relax())
    unit_pad: torch.Tensor | None = None
    # rounding scales (set by forward_bounds, see jacobian.rounding_weights): ``magnitude``
    # bounds the terms summed into z (the pre-activation), ``rounding`` is the pad per unit
    # of |coefficient on B| that one backward-substitution step through this layer needs
    magnitude: torch.Tensor | None = None
    rounding: torch.Tensor | None = None


def input_scales(relaxes: list[Relaxation], xl: torch.Tensor, xu: torch.Tensor,
                 k: int) -> list[torch.Tensor]:
    """max |B_j| per domain and neuron for the bases j < k: the box, then each activation's
    output bounds."""
    return [torch.maximum(xl.abs(), xu.abs())] + [
        torch.maximum(r.bl.abs(), r.bu.abs()) for r in relaxes[:k - 1]]


def _two_piece(l, u, kappa, v, p, q, split):
    """Relaxation of z -> v + p (z - kappa) for z < kappa, v + q (z - kappa) for z >= kappa."""
    right = (split > 0) | (l > kappa)
    left = ((split < 0) | (u < kappa)) & ~right
    mixed = ~right & ~left
    kappa, v, p, q = (torch.as_tensor(t, dtype=l.dtype, device=l.device).expand_as(l)
                      for t in (kappa, v, p, q))
    slope_fixed = torch.where(right, q, p)
    phi_l = v + torch.where(l < kappa, p, q) * (l - kappa)
    phi_u = v + torch.where(u < kappa, p, q) * (u - kappa)
    width = u - l
    chord = torch.where(width > 0, (phi_u - phi_l) / torch.where(width > 0, width, 1.0), q)
    chord_icpt = phi_l - chord * l
    tangent = torch.where(u - kappa >= kappa - l, q, p)
    tangent_icpt = v - tangent * kappa
    convex = q >= p
    su = torch.where(mixed, torch.where(convex, chord, tangent), slope_fixed)
    iu = torch.where(mixed, torch.where(convex, chord_icpt, tangent_icpt),
                     v - slope_fixed * kappa)
    sl = torch.where(mixed, torch.where(convex, tangent, chord), slope_fixed)
    il = torch.where(mixed, torch.where(convex, tangent_icpt, chord_icpt),
                     v - slope_fixed * kappa)
    at_kink = torch.where(mixed, v, phi_l)
    bl = torch.minimum(torch.minimum(phi_l, phi_u), at_kink)
    bu = torch.maximum(torch.maximum(phi_l, phi_u), at_kink)
    dl = torch.where(mixed, torch.minimum(p, q), slope_fixed)
    du = torch.where(mixed, torch.maximum(p, q), slope_fixed)
    return Relaxation(sl, il, su, iu, bl, bu, dl, du, mixed)


def _smooth(l, u, fn, deriv, peak):
    """Monotone activation with a unimodal derivative peaking at 0 (Sigmoid, Tanh)."""
    fl, fu = fn(l), fn(u)
    d_l, d_u = deriv(l), deriv(u)
    dmin = torch.minimum(d_l, d_u)
    dmax = torch.where((l <= 0) & (u >= 0), torch.full_like(l, peak), torch.maximum(d_l, d_u))
    return _mean_value(l, u, fl, fu, dmin, dmax, fl, fu)


def _mean_value(l, u, fl, fu, dmin, dmax, bl, bu):
    """The mean-value lines f(l) + [dmin, dmax] (z - l) and f(u) - [dmin, dmax] (u - z),
    whichever is tighter at the midpoint, for a function whose (Clarke) derivative lies in
    [dmin, dmax] on [l, u] (the mean value theorem: sound for any such function, monotone or
    not), with output bounds [bl, bu] given. The derivative interval is widened outwards by
    SLACK relative plus 1e-14 absolute (derivatives near 0 come from sums that cancel)."""
    dmin = dmin - SLACK * dmin.abs() - 1e-14
    dmax = dmax + SLACK * dmax.abs() + 1e-14
    mid = 0.5 * (l + u)
    up_a, up_b = fl + dmax * (mid - l), fu - dmin * (u - mid)
    use_a = up_a <= up_b
    su = torch.where(use_a, dmax, dmin)
    iu = torch.where(use_a, fl - dmax * l, fu - dmin * u)
    lo_a, lo_b = fl + dmin * (mid - l), fu - dmax * (u - mid)
    use_a = lo_a >= lo_b
    sl = torch.where(use_a, dmin, dmax)
    il = torch.where(use_a, fl - dmin * l, fu - dmax * u)
    return Relaxation(sl, il, su, iu, bl, bu, dmin, dmax, torch.zeros_like(l, dtype=torch.bool))


def _elu(alpha: float, l, u):
    """ELU: increasing (alpha >= 0); derivative alpha e^z below 0 (increasing) and 1 from 0
    on, so on [l, u] it lies between its values at the ends and, when 0 is inside, alpha and
    1 (Clarke's set at the kink)."""
    def deriv(z):
        return torch.where(z < 0, alpha * torch.exp(torch.clamp(z, max=0.0)),
                           torch.ones_like(z))

    fl, fu = F.elu(l, alpha), F.elu(u, alpha)
    d_l, d_u = deriv(l), deriv(u)
    inside = (l < 0) & (u >= 0)
    dmin = torch.where(inside, torch.clamp(d_l, max=min(alpha, 1.0)), torch.minimum(d_l, d_u))
    dmax = torch.where(inside, torch.clamp(d_u, min=max(alpha, 1.0)), torch.maximum(d_l, d_u))
    return _mean_value(l, u, fl, fu, dmin, dmax, fl, fu)


def _softplus(l, u):
    """Softplus: increasing, derivative sigmoid (increasing)."""
    fl = torch.logaddexp(l, torch.zeros_like(l))
    fu = torch.logaddexp(u, torch.zeros_like(u))
    return _mean_value(l, u, fl, fu, torch.sigmoid(l), torch.sigmoid(u), fl, fu)


def _quasiconvex(name: str, fn, deriv, l, u):
    """GELU, SiLU: decreasing then increasing, with derivative decreasing, increasing, then
    decreasing again (extremes at ``peaks``): on [l, u] the derivative lies between its
    values at the ends and at the peaks inside; the maximum is at an end, the minimum at an
    end or, when the argmin is inside, at most the tabled minimum (a lower bound)."""
    ext = O.SMOOTH_EXTREMA[name]
    (p_lo, p_hi), (d_lo, d_hi) = ext["peaks"], ext["slopes"]
    fl, fu = fn(l), fn(u)
    d_l, d_u = deriv(l), deriv(u)
    dmin = torch.where((l <= p_lo) & (u >= p_lo), torch.full_like(l, d_lo),
                       torch.minimum(d_l, d_u))
    dmax = torch.where((l <= p_hi) & (u >= p_hi), torch.full_like(l, d_hi),
                       torch.maximum(d_l, d_u))
    a = ext["argmin"]
    bl = torch.where((l <= a) & (u >= a), torch.full_like(l, ext["minimum"]),
                     torch.minimum(fl, fu))
    return _mean_value(l, u, fl, fu, dmin, dmax, bl, torch.maximum(fl, fu))


def _gelu_derivative(z: torch.Tensor) -> torch.Tensor:
    """Phi(z) + z phi(z)."""
    return 0.5 * torch.special.erfc(-z / math.sqrt(2.0)) + \
        z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


def _silu_derivative(z: torch.Tensor) -> torch.Tensor:
    """sigmoid(z) (1 + z sigmoid(-z))."""
    return torch.sigmoid(z) * (1.0 + z * torch.sigmoid(-z))


def _sigmoid_derivative(z: torch.Tensor) -> torch.Tensor:
    """sigma'(z) = e^-|z| / (1 + e^-|z|)^2, accurate to a few ulps in relative terms (the
    form sigma (1 - sigma) loses all relative accuracy for large |z|)."""
    e = torch.exp(-z.abs())
    return e / (1.0 + e) ** 2


def _clip(op: O.Clip, l, u, split):
    """Clip to [low, high]. Each infinite limit is handled explicitly: Clip(-inf, inf) is the
    identity, Clip(low, inf) = max(z, low) and Clip(-inf, high) = min(z, high) have one kink;
    low >= high is the constant high (ONNX and torch agree on that case)."""
    lo, hi = float(op.low), float(op.high)
    zero, one = torch.zeros_like(l), torch.ones_like(l)
    no_split = torch.zeros_like(split)
    if not hi > lo:
        return Relaxation(zero, zero + hi, zero, zero + hi, zero + hi, zero + hi, zero, zero,
                          torch.zeros_like(l, dtype=torch.bool))
    if math.isinf(lo) and math.isinf(hi):
        return Relaxation(one, zero, one, zero, l.clone(), u.clone(), one, one,
                          torch.zeros_like(l, dtype=torch.bool))
    if math.isinf(hi):
        return _no_mixed(_two_piece(l, u, lo, lo, 0.0, 1.0, no_split))
    if math.isinf(lo):
        return _no_mixed(_two_piece(l, u, hi, hi, 1.0, 0.0, no_split))
    lower_kink = u <= hi  # only the lower kink can lie inside [l, u]
    kappa = torch.where(lower_kink, torch.full_like(l, lo), torch.full_like(l, hi))
    p = torch.where(lower_kink, zero, one)
    q = 1.0 - p
    r = _two_piece(l, u, kappa, kappa, p, q, no_split)
    both = (l < lo) & (u > hi)  # crosses both kinks: constant bounds, d in [0, 1]
    return Relaxation(
        torch.where(both, zero, r.sl), torch.where(both, zero + lo, r.il),
        torch.where(both, zero, r.su), torch.where(both, zero + hi, r.iu),
        torch.where(both, zero + lo, r.bl), torch.where(both, zero + hi, r.bu),
        torch.where(both, zero, r.dl), torch.where(both, one, r.du),
        torch.zeros_like(l, dtype=torch.bool))


def _no_mixed(r: Relaxation) -> Relaxation:
    """Clip kinks are not branched on: never report them as splittable."""
    r.mixed = torch.zeros_like(r.mixed)
    return r


def needs_bounds(op: O.Op, l: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Where tighter bounds than [l, u] could change the relaxation of ``op``: a kink of a
    piecewise-linear activation lies strictly inside (l, u) (else the neuron is on one
    linear piece and relaxed exactly, whatever its bounds); everywhere for smooth ones."""
    if isinstance(op, (O.Relu, O.LeakyRelu)):
        return (l < 0) & (u > 0)
    if isinstance(op, O.Clip):
        lo, hi = float(op.low), float(op.high)
        if not hi > lo:
            return torch.zeros_like(l, dtype=torch.bool)
        return ((l < lo) & (u > lo)) | ((l < hi) & (u > hi))
    return torch.ones_like(l, dtype=torch.bool)


def relax(op: O.Op, l: torch.Tensor, u: torch.Tensor, split: torch.Tensor) -> Relaxation:
    """Relaxation of ``op`` on [l, u]; ``split`` (+1 / -1 / 0) fixes a ReLU's side of 0."""
    if isinstance(op, O.Relu):
        r = _two_piece(l, u, 0.0, 0.0, 0.0, 1.0, split)
    elif isinstance(op, O.LeakyRelu):
        r = _two_piece(l, u, 0.0, 0.0, op.alpha, 1.0, split)
    elif isinstance(op, O.Clip):
        r = _clip(op, l, u, split)
    elif isinstance(op, O.Sigmoid):
        r = _smooth(l, u, torch.sigmoid, _sigmoid_derivative, 0.25)
    elif isinstance(op, O.Tanh):
        r = _smooth(l, u, torch.tanh, lambda z: 4.0 * _sigmoid_derivative(2.0 * z), 1.0)
    elif isinstance(op, O.Elu):
        r = _elu(float(op.alpha), l, u)
    elif isinstance(op, O.Softplus):
        r = _softplus(l, u)
    elif isinstance(op, O.Gelu):
        r = _quasiconvex("gelu", F.gelu, _gelu_derivative, l, u)
    elif isinstance(op, O.Silu):
        r = _quasiconvex("silu", F.silu, _silu_derivative, l, u)
    else:  # pragma: no cover - the estimator's handler table refuses other ops first
        raise TypeError(f"no relaxation for {op.kind}")
    scale = torch.maximum(torch.maximum(l.abs(), u.abs()),
                          torch.maximum(r.bl.abs(), r.bu.abs()))
    r.unit_pad = SLACK * scale
    pad = (1 + r.su.abs() + r.sl.abs()) * r.unit_pad
    r.iu, r.il = r.iu + pad, r.il - pad
    r.bl, r.bu = r.bl - pad, r.bu + pad
    r.iu = poison("local.relaxation", r.iu)
    for name in ("sl", "il", "su", "iu", "bl", "bu", "dl", "du"):
        checked_array(getattr(r, name), f"the {op.kind} relaxation ({name})")
    return r
