"""The input region of box-scoped methods (exact, local): x0 +- eps in linf, or a domain."""

from __future__ import annotations

import numpy as np

from ..errors import InputError


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
        lo, hi = (float(v) for v in value)
    if not lo <= hi:
        raise InputError(f"domain {lo:g},{hi:g}: LOW must not exceed HIGH")
    return lo, hi


def box_from_options(options: dict, n_in: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """The input box: center +- eps (local) or the domain [low, high]^n (default [-1, 1])."""
    if options.get("center") is not None:
        center = np.asarray(options["center"], dtype=np.float64).reshape(-1)
        if center.size != n_in:
            raise InputError(f"the input point has {center.size} values, the model takes {n_in}")
        eps = float(options.get("eps", 0.0))
        low, high = center - eps, center + eps
        if eps < 0 or not np.isfinite(eps):
            raise InputError(f"eps must be a finite number >= 0, got {eps}")
        domain = parse_domain(options.get("domain"))
        if domain is not None:
            low, high = np.maximum(low, domain[0]), np.minimum(high, domain[1])
            if np.any(low > high):
                raise InputError(f"the box x0 +- {eps:g} does not meet the domain "
                                 f"[{domain[0]:g}, {domain[1]:g}]")
        describe = f"x0 +- {eps:g} (linf)"
        if domain is not None:
            describe += f" within [{domain[0]:g}, {domain[1]:g}]"
        return low, high, {"kind": "box", "eps": eps, "describe": describe}
    dl, dh = parse_domain(options.get("domain")) or (-1.0, 1.0)
    return (np.full(n_in, float(dl)), np.full(n_in, float(dh)),
            {"kind": "domain", "low": float(dl), "high": float(dh),
             "describe": f"[{dl:g}, {dh:g}]^{n_in}"})
