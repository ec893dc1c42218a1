"""The input region of box-scoped methods (exact, local): x0 +- eps in linf, or a domain."""

from __future__ import annotations

import numpy as np

from ...errors import InputError


def parse_domain(value) -> tuple[float, float] | None:
    """A data range LOW,HIGH from a pair or a "LOW,HIGH" string (config or -o domain=0,1)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            lo, hi = (float(v) for v in value.split(","))
        except ValueError:
            raise InputError(f"domain {value!r}: expected LOW,HIGH") from None
    else:
        try:
            lo, hi = (float(v) for v in value)
        except (TypeError, ValueError):
            raise InputError(f"domain {value!r}: expected two numbers LOW, HIGH") from None
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise InputError(f"domain {lo:g},{hi:g}: LOW and HIGH must be finite numbers")
    if not lo <= hi:
        raise InputError(f"domain {lo:g},{hi:g}: LOW must not exceed HIGH")
    return lo, hi


def parse_eps(value) -> float:
    """A box radius: a finite number >= 0 (NaN and inf are refused)."""
    try:
        eps = float(value)
    except (TypeError, ValueError):
        raise InputError(f"eps {value!r}: expected a number") from None
    if not (np.isfinite(eps) and eps >= 0):
        raise InputError(f"eps must be a finite number >= 0, got {value}")
    return eps


def box_from_options(options: dict, n_in: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The input box: center +- eps (local) or the domain [low, high]^n (default [-1, 1])."""
    if options.get("center") is not None:
        center = np.asarray(options["center"], dtype=np.float64).reshape(-1)
        if center.size != n_in:
            raise InputError(f"the input point has {center.size} values, the model takes {n_in}")
        if not np.all(np.isfinite(center)):
            raise InputError("the input point contains NaN or infinite values; a box around it "
                             "means nothing")
        eps = parse_eps(options.get("eps", 0.0))
        low, high = center - eps, center + eps
        domain = parse_domain(options.get("domain"))
        if domain is not None:
            outside = np.flatnonzero((center < domain[0]) | (center > domain[1]))
            if outside.size:
                raise InputError(
                    f"the input point lies outside the domain [{domain[0]:g}, {domain[1]:g}] "
                    f"(value {center[outside[0]]:g} at position {int(outside[0])}): a box "
                    "clipped to the domain would not contain it; fix the point or the domain")
            low, high = np.maximum(low, domain[0]), np.minimum(high, domain[1])
        describe = f"x0 +- {eps:g} (linf)"
        if domain is not None:
            describe += f" within [{domain[0]:g}, {domain[1]:g}]"
        return low, high, {"kind": "box", "eps": eps, "describe": describe}
    dl, dh = parse_domain(options.get("domain")) or (-1.0, 1.0)
    return (np.full(n_in, float(dl)), np.full(n_in, float(dh)),
            {"kind": "domain", "low": float(dl), "high": float(dh),
             "describe": f"[{dl:g}, {dh:g}]^{n_in}"})


#: how far a witness point moves toward a random point of its box (a fraction of the way)
NUDGE = 1e-6


def nudged(points: np.ndarray, low: np.ndarray, high: np.ndarray,
           rng: np.random.Generator) -> np.ndarray:
    """Points moved a fraction NUDGE of the way to uniform random points of the box [low,
    high] (so they stay inside it).

    A Jacobian taken by autograd is a valid lower bound on the Lipschitz constant only where
    the network is differentiable. The centre and the corners of a box often lie exactly on
    a kink (zero biases, zero pixels), where autograd's one-sided choices can give a matrix
    that no nearby point has (f = relu(x + 1) - relu(x) + relu(-x) is flat near 0, autograd
    says 1 at 0). The moved points have a density, so they avoid kinks almost surely.
    """
    low = np.broadcast_to(low, points.shape)
    high = np.broadcast_to(high, points.shape)
    target = low + rng.uniform(size=points.shape) * (high - low)
    return np.clip(points + NUDGE * (target - points), low, high)
