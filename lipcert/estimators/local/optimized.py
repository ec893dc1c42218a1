"""Optimised pre-activation bounds: alpha-CROWN lower slopes and beta-CROWN split multipliers.

CROWN (Zhang et al., NeurIPS 2018) bounds sign * z_k by backward substitution, relaxing each
unstable ReLU from below by a line through its kink. Any slope a in [p, q] (the two slopes of
a convex two-piece activation: 0 and 1 for ReLU) gives a valid lower line, so the slopes are
free parameters, one per (bounded row, neuron): alpha-CROWN (Xu et al., "Fast and Complete",
ICLR 2021, Sec. 3.1) optimises them by projected gradient.

Inside branch-and-bound a domain also carries split constraints s_i z_i >= 0 (s_i = +1 for
z_i >= 0, -1 for z_i <= 0). For any beta >= 0,
    max sign * z_k  <=  max over the box of  sign * z_k + sum_i beta_i s_i z_i,
and the right-hand side is bounded by the same backward substitution with beta_i s_i added to
the coefficient of z_i when the pass reaches its layer (beta-CROWN: Wang et al., NeurIPS
2021, Thm. 3.1). Constraints of the bounded row's own layer are used too (they tie neurons of
one layer that depend on the input through the same few directions).

Every iterate is a sound bound, so the result is the elementwise best over all iterates,
starting from plain CROWN (alpha at CROWN's own choice, beta = 0): never worse than CROWN.
"""

from __future__ import annotations

import math
import time

import torch

from ...ir import ops as O
from ...ir.lowering import AffineDag
from .factor import Factor
from .relaxations import Relaxation, input_scales

#: Adam's step size (slopes lie in [p, q], multipliers are scaled to order 1), shrunk by
#: DECAY per step: the bounds are piecewise linear in the parameters, and a constant step
#: would circle the kink where a bound is smallest
STEP = 0.3
DECAY = 0.95
#: steps without gain after which the optimisation stops early
PATIENCE = 6


def _slope_range(op: O.Op) -> tuple[float, float] | None:
    """[p, q] of a convex two-piece activation whose lower line through the kink is free."""
    if isinstance(op, O.Relu):
        return 0.0, 1.0
    if isinstance(op, O.LeakyRelu) and op.alpha <= 1.0:
        return float(op.alpha), 1.0
    return None


def _stalled(history: list[float]) -> bool:
    """No gain over the last ``PATIENCE`` steps (relative 1e-7 of the summed bounds)."""
    if len(history) <= PATIENCE:
        return False
    then, now = history[-1 - PATIENCE], history[-1]
    return not then - now > 1e-7 * (1.0 + abs(now))  # NaN stops too


def _upper(dag: AffineDag, k: int, relaxes: list[Relaxation], xl: torch.Tensor,
           xu: torch.Tensor, start: torch.Tensor, alpha: dict[int, torch.Tensor],
           masks: dict[int, torch.Tensor], beta: dict[int, torch.Tensor],
           signs: dict[int, torch.Tensor],
           record: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Upper bound (D, r) of start @ z_k (+ the multiplier terms) over the box; ``start`` is
    (D, r, n_k), ``alpha[j]`` (D, r, n_j) used where ``masks[j]`` (D, n_j), ``beta[j]``
    (D, r, n_j) >= 0 times ``signs[j]`` (D, n_j) (0 where no split). ``record``: filled
    with the l1 norm (D, r) of each row's coefficients on the layer below z_j, for every j
    with multipliers (their natural scale, see :func:`optimized_crown`)."""
    aff = dag.pre[k - 1]
    w = start if k not in beta else start + beta[k] * signs[k][:, None, :]
    const = (w @ aff.bias[:, None])[..., 0]
    # magnitude of the terms whose rounding the bound must cover (the multipliers make terms
    # that cancel, so the pad is relative to them, not to the result), as crown_max's
    # rounding_weights but with the actual coefficients w on each z_j: |w| 2 magnitude_j
    # (products through the maps, their representation), |p| 3 |intercepts|, |p| max|B_j|
    scales = input_scales(relaxes, xl, xu, k)
    mag = 2.0 * (w.abs() @ aff.magnitude(scales)[..., None])[..., 0]
    coeffs = {j: Factor.of(aff, j).right(w) for j in aff.maps}
    if record is not None and k in beta:
        record[k] = sum(t.abs().sum(-1) for t in coeffs.values())
    for j in range(k - 1, 0, -1):
        a = coeffs.pop(j, None)
        if a is None:
            continue
        r, pre = relaxes[j - 1], dag.pre[j - 1]
        pp, pn = a.clamp(min=0), a.clamp(max=0)
        s_lo, i_lo = r.sl[:, None, :], r.il[:, None, :]
        if j in alpha:
            m = masks[j][:, None, :]
            s_lo = torch.where(m, alpha[j], s_lo)
            # the line a z through the kink at 0, padded like relax() pads its own lines
            i_lo = torch.where(m, -(1 + r.su.abs()[:, None, :] + alpha[j].abs())
                               * r.unit_pad[:, None, :], i_lo)
        w = pp * r.su[:, None, :] + pn * s_lo
        const = const + (pp * r.iu[:, None, :]).sum(-1) + (pn * i_lo).sum(-1)
        mag = mag + 3.0 * ((pp * r.iu.abs()[:, None, :]).sum(-1) - (pn * i_lo.abs()).sum(-1))
        mag = mag + (a.abs() @ scales[j][..., None])[..., 0]
        if j in beta:
            w = w + beta[j] * signs[j][:, None, :]
        const = const + (w @ pre.bias[:, None])[..., 0]
        mag = mag + 2.0 * (w.abs() @ r.magnitude[..., None])[..., 0]
        norm = 0.0
        for i in pre.maps:
            t = Factor.of(pre, i).right(w)
            if record is not None and j in beta:
                norm = norm + t.abs().sum(-1)
            coeffs[i] = coeffs[i] + t if i in coeffs else t
        if record is not None and j in beta:
            record[j] = norm
    a0 = coeffs.get(0)
    if a0 is not None:
        const = const + (a0.clamp(min=0) @ xu[..., None]
                         + a0.clamp(max=0) @ xl[..., None])[..., 0]
        mag = mag + (a0.abs() @ scales[0][..., None])[..., 0]
    return const + dag.slack * mag.detach()


def _ancestors(dag: AffineDag, k: int) -> set[int]:
    """The activations z_k depends on (bases reached from pre[k - 1] through the DAG's maps):
    only their slopes and splits can move its bound (parallel branches, e.g. a MaxPool's
    windows of several sizes, have none in common)."""
    seen: set[int] = set()
    todo = [j for j in dag.pre[k - 1].maps if j > 0]
    while todo:
        j = todo.pop()
        if j not in seen:
            seen.add(j)
            todo.extend(i for i in dag.pre[j - 1].maps if i > 0)
    return seen


def optimized_crown(dag: AffineDag, k: int, relaxes: list[Relaxation], xl: torch.Tensor,
                    xu: torch.Tensor, rows: torch.Tensor, splits: list[torch.Tensor] | None,
                    iterations: int, deadline: float = math.inf
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Lower and upper bounds (D, r) of z_k[rows] by alpha/beta-CROWN, the best over
    ``iterations`` Adam steps and the plain CROWN start (stopping early when the summed
    bounds stall, or at ``deadline``, a time.perf_counter() value); None when nothing is
    free to optimise (no unstable ReLU before layer k and no split constraint)."""
    d, r = xl.shape[0], rows.numel()
    masks: dict[int, torch.Tensor] = {}
    ranges: dict[int, tuple[float, float]] = {}
    reach = _ancestors(dag, k)
    for j in range(1, k):
        rng = _slope_range(dag.acts[j - 1])
        if j in reach and rng is not None and bool(relaxes[j - 1].mixed.any()):
            masks[j], ranges[j] = relaxes[j - 1].mixed, rng
    signs: dict[int, torch.Tensor] = {}
    if splits is not None:
        for j in range(1, k + 1):
            s = splits[j - 1]
            if (j == k or j in reach) and bool((s != 0).any()):
                signs[j] = s.to(xl.dtype)
    if not masks and not signs:
        return None
    n_k = dag.sizes[k]
    start = torch.zeros(2 * r, n_k, dtype=xl.dtype, device=xl.device)
    idx = torch.arange(r, device=xl.device)
    start[idx, rows] = 1.0  # rows 0..r-1: upper bounds of z_k; r..2r-1: of -z_k
    start[r + idx, rows] = -1.0
    start = start.expand(d, -1, -1)
    alpha = {j: relaxes[j - 1].sl[:, None, :].expand(-1, 2 * r, -1).clone().requires_grad_()
             for j in masks}
    # beta = theta * scale: a multiplier of neuron i for row r is of the order of the row's
    # coefficients on the layer below z_i over those of z_i's own row (CROWN's pass tells)
    theta = {j: torch.zeros(d, 2 * r, dag.sizes[j], dtype=xl.dtype, device=xl.device,
                            requires_grad=True)
             for j in signs}
    record: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        _upper(dag, k, relaxes, xl, xu, start, alpha, masks,
               {j: t.detach() for j, t in theta.items()}, signs, record)
    scale = {}
    for j in signs:
        own = sum(m.abs().sum(1) for m in dag.pre[j - 1].maps.values())  # (n_j,)
        scale[j] = torch.where(own > 0, record[j][..., None] / torch.where(own > 0, own, 1.0),
                               torch.zeros_like(own))
    opt = torch.optim.Adam([*alpha.values(), *theta.values()], lr=STEP)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, DECAY)
    best = None
    history: list[float] = []
    for step in range(iterations + 1):
        beta = {j: t * scale[j] for j, t in theta.items()}
        value = _upper(dag, k, relaxes, xl, xu, start, alpha, masks, beta, signs)
        detached = value.detach()
        # a NaN iterate is skipped (fmin); the CROWN start is checked by the caller
        best = detached if best is None else torch.fmin(best, detached)
        history.append(float(best.sum()))
        if step == iterations or _stalled(history) or time.perf_counter() > deadline \
                or not value.requires_grad:  # no free slope reaches z_k (parallel branches)
            break
        opt.zero_grad(set_to_none=True)
        value.sum().backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            for j, a in alpha.items():
                a.clamp_(*ranges[j])
            for t in theta.values():
                t.clamp_(min=0.0)
    return -best[:, r:], best[:, :r]
