"""The ``lower`` estimator: an empirical lower bound, the yardstick of tightness.

Any ||J(x)|| at a point where the network is differentiable is <= the Lipschitz constant, and
so is any secant quotient ||f(x) - f(y)|| / ||x - y||. We sample many inputs (several scales,
so many activation regions), then hill-climb from the best ones with shrinking random steps,
because for piecewise-linear nets ||J(x)|| is piecewise constant and its gradient is zero
almost everywhere. The value is a true lower bound, never a certificate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..ir import evaluate
from ..ir.graph import Graph
from ..soundness import poison
from .base import Bound, Estimator, register
from .common.region import NUDGE, box_from_options, parse_domain
from .naive import MULTI, UNARY
from .settings import setting


def jacobians(graph: Graph, xs: torch.Tensor) -> torch.Tensor:
    """Jacobians (B, m, n) of the flattened output w.r.t. the flattened input at ``xs``."""

    def f(x):
        return evaluate.run(graph, x).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(f))(xs)
    return jac.reshape(xs.shape[0], jac.shape[1], -1)


def jacobian_norms(graph: Graph, xs: torch.Tensor, norm: str) -> torch.Tensor:
    jac = jacobians(graph, xs)
    if norm == "2":
        return torch.linalg.matrix_norm(jac, ord=2)
    return jac.abs().sum(dim=-1).max(dim=-1).values


def _batched_norms(graph: Graph, xs: torch.Tensor, norm: str, batch: int) -> torch.Tensor:
    """Jacobian norms; a non-finite one (overflow) proves nothing and counts as 0."""
    norms = torch.cat([jacobian_norms(graph, xs[i:i + batch], norm)
                       for i in range(0, xs.shape[0], batch)])
    return torch.where(torch.isfinite(norms), norms, torch.zeros_like(norms))


def sample_lower_bound(graph: Graph, norm: str = "2", *, samples: int = 256,
                       climb_steps: int = 30, seed: int = 0,
                       center: np.ndarray | None = None, radius: float | None = None,
                       domain: tuple[float, float] | None = None) -> tuple[float, np.ndarray]:
    """Largest Jacobian norm found; returns (value, the input where it was found).

    With ``center`` and ``radius`` the search stays in the linf box around center (local);
    ``domain`` clips inputs to a data range.
    """
    gen = torch.Generator().manual_seed(seed)
    shape = graph.input_shape
    n_in = int(np.prod(shape))
    batch = max(1, min(256, 2_000_000 // max(1, n_in * int(np.prod(graph.output_shape)))))

    def project(x: torch.Tensor) -> torch.Tensor:
        if center is not None and radius is not None:
            c = torch.as_tensor(center, dtype=torch.float64).reshape(shape)
            x = torch.max(torch.min(x, c + radius), c - radius)
        if domain is not None:
            x = x.clamp(*domain)
        return x

    if center is not None and radius is not None:
        c = torch.as_tensor(center, dtype=torch.float64).reshape(shape)
        u = torch.rand((samples, *shape), generator=gen, dtype=torch.float64)
        xs = c + radius * (2 * u - 1)
        xs[0] = c
    else:
        scales = torch.tensor([0.1, 1.0, 3.0, 10.0], dtype=torch.float64)
        s = scales[torch.arange(samples) % len(scales)].reshape(-1, *([1] * len(shape)))
        xs = torch.randn((samples, *shape), generator=gen, dtype=torch.float64) * s
        half = samples // 2
        xs[half:] = torch.rand((samples - half, *shape), generator=gen, dtype=torch.float64)
    xs = project(xs)
    off_kinks = _off_kinks(shape, center, radius, domain, gen)
    with torch.no_grad():
        norms = _batched_norms(graph, off_kinks(xs), norm, batch)
    best_k = torch.topk(norms, min(8, samples)).indices
    points, values = xs[best_k].clone(), norms[best_k].clone()
    step = (radius if radius is not None else 1.0) * 0.5
    for _ in range(climb_steps):
        trial = project(points + step * torch.randn(points.shape, generator=gen,
                                                    dtype=torch.float64))
        with torch.no_grad():
            tv = _batched_norms(graph, off_kinks(trial), norm, batch)
        better = tv > values
        points[better], values[better] = trial[better], tv[better]
        if not better.any():
            step *= 0.7
    i = int(torch.argmax(values))
    secant = secant_ascent(graph, norm, points, project, gen,
                           radius if radius is not None else 1.0)
    if secant > float(values[i]):
        return secant, points[i].numpy()
    return float(values[i]), points[i].numpy()


def _off_kinks(shape, center, radius, domain, gen: torch.Generator):
    """Where Jacobians are taken: each point moved a fraction NUDGE of the way to a random
    point of the region (the box, the domain, or a small Gaussian step without either), so
    that no Jacobian is taken on a kink (see :func:`nudged`); the centre and the clamped
    points on the box's faces often lie on one."""
    c = None if center is None else torch.as_tensor(center, dtype=torch.float64).reshape(shape)

    def move(x: torch.Tensor) -> torch.Tensor:
        u = torch.rand(x.shape, generator=gen, dtype=torch.float64)
        if c is not None and radius is not None:
            lo, hi = c - radius, c + radius
            if domain is not None:
                lo, hi = lo.clamp(*domain), hi.clamp(*domain)
        elif domain is not None:
            lo, hi = torch.full_like(x, domain[0]), torch.full_like(x, domain[1])
        else:
            step = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            return x + NUDGE * (1 + x.abs()) * step
        return torch.min(torch.max(x + NUDGE * (lo + u * (hi - lo) - x), lo), hi)

    return move


def secant_ascent(graph: Graph, norm: str, starts: torch.Tensor, project, gen,
                  scale: float, steps: int = 60) -> float:
    """Gradient ascent on ||f(x) - f(y)|| / ||x - y|| over pairs (x, y): a true lower bound
    that, unlike ||J(x)||, has a useful gradient on piecewise-linear nets."""
    p = 2 if norm == "2" else float("inf")
    x = starts.clone()
    y = project(x + 0.05 * scale * torch.randn(x.shape, generator=gen, dtype=torch.float64))
    x.requires_grad_(True)
    y.requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=0.01 * scale)
    best = 0.0

    def quotients(a, b):
        fa = torch.func.vmap(lambda v: evaluate.run(graph, v))(a).reshape(len(a), -1)
        fb = torch.func.vmap(lambda v: evaluate.run(graph, v))(b).reshape(len(b), -1)
        num = torch.linalg.vector_norm(fa - fb, ord=p, dim=1)
        den = torch.linalg.vector_norm((a - b).reshape(len(a), -1), ord=p, dim=1)
        return num / den.clamp_min(1e-300), den

    for _ in range(steps):
        q, den = quotients(x, y)
        valid = den > 1e-9 * scale
        if valid.any():
            best = max(best, float(q[valid].detach().max()))
        opt.zero_grad()
        (-q[valid].sum() if valid.any() else -q.sum()).backward()
        opt.step()
        with torch.no_grad():
            x.copy_(project(x))
            y.copy_(project(y))
    with torch.no_grad():
        q, den = quotients(x, y)
        valid = den > 1e-9 * scale
        if valid.any():
            best = max(best, float(q[valid].detach().max()))
    return best


@dataclass(frozen=True)
class LowerSettings:
    samples: int = setting(256, "random starting points (several scales), then hill "
                                "climbing and secant-quotient ascent", minimum=1)
    seed: int = setting(0, "random seed")


@register
class LowerEstimator(Estimator):
    name = "lower"
    settings = LowerSettings
    summary = "empirical lower bound: largest Jacobian norm found by sampling (not a bound)"
    certificate = False
    handlers = {**UNARY, **MULTI}

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:
        samples = int(options.get("samples", 256))
        center, eps = options.get("center"), options.get("eps")
        if center is not None:  # refuses NaN/inf centres and radii, centres off the domain
            box_from_options(options, int(np.prod(graph.input_shape)))
        value, where = sample_lower_bound(
            graph, norm, samples=samples, seed=int(options.get("seed", 0)),
            center=center, radius=None if center is None else float(eps),
            domain=parse_domain(options.get("domain")))
        value = poison("lower.value", value)
        if not value >= 0:  # NaN: the search proved nothing; never a certificate either way
            value, notes = 0.0, ["the sampled lower bound was not a number (overflow?); "
                                 "reported as 0"]
        else:
            notes = []
        scope = "global" if center is None else "box"
        return Bound(method=self.name, norm=norm, upper=None, lower=value, sound=False,
                     scope=scope,
                     notes=["a lower bound on the Lipschitz constant (largest Jacobian norm "
                            "or secant quotient found; an estimate, not a certificate)", *notes],
                     details={"samples": samples})
