"""Bound propagation through a network and through its Clarke Jacobian.

Shi, Wang, Zhang, Kolter, Hsieh, "Efficiently Computing Local Lipschitz Constants of Neural
Networks via Bound Propagation", NeurIPS 2022. On an :class:`AffineDag`
(z_k = sum_j M_kj B_j + c_k, B_k = sigma_k(z_k)) and a box X:

* **forward** (:func:`forward_bounds`): interval and CROWN bounds on every pre-activation
  z_k (Zhang et al., NeurIPS 2018), the tighter of the two, under per-neuron split
  constraints (z >= 0 or z <= 0) and intersected with the parent domain's bounds;
* **backward** (:func:`jacobian_bound`): for an output functional c, the gradient of c^T f is
  the adjoint recursion t_j = M_out,j^T c + sum_{k>j} M_kj^T y_k, y_k = d_k * t_k, where d_k
  ranges over Clarke's derivative interval [dl, du] of sigma_k on the box. Each product
  y = d t is relaxed by the chords of max(dl t, du t) and min(dl t, du t) over [tl, tu]
  (the tightest linear bounds given d free in [dl, du]); intervals of every t_k come from
  linear bound propagation back to the constant c (and interval arithmetic, the tighter);
  finally ||g||_1 = sum_i |g_i| is bounded by the chord of |.| over [gl_i, gu_i] (Shi et
  al. Sec. 3.2-3.3). The result bounds max_{x in X} max_{G in dC(c^T f)(x)} ||G||_1, the
  local linf -> linf Lipschitz constant of c^T f on X.

Both passes compute linear bounds only on the rows whose relaxation the bounds can change
(sparse intermediate bounds, as auto_LiRPA does): a neuron that intervals place on one
linear piece of its activation is relaxed exactly whatever its bounds, and so is a product
y = d t whose derivative set is one number. Such rows keep their interval bounds, which only
feed later intervals (themselves intersected with linear bounds). Products with many rows
go through a map's matrix-free operator where the DAG has one (:class:`Factor`).

All tensors carry a leading batch dimension D (domains of branch-and-bound, or queries).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch

from ...ir import ops as O
from ...ir.lowering import Affine, AffineDag
from ...soundness import checked_array, injections, poison
from .factor import Factor
from .optimized import optimized_crown
from .relaxations import SLACK, Relaxation, input_scales, needs_bounds, relax

INFEASIBLE_TOL = 1e-9


@dataclass
class ForwardBounds:
    zl: list[torch.Tensor]  # per activation, (D, n_k)
    zu: list[torch.Tensor]
    relax: list[Relaxation]
    infeasible: torch.Tensor  # (D,) bool: a split constraint contradicts the bounds

    def expand(self, d: int) -> ForwardBounds:
        """The bounds of one domain (D = 1) as views for d identical domains."""
        def grow(t: torch.Tensor) -> torch.Tensor:
            return t.expand(d, *t.shape[1:])

        relaxes = [Relaxation(**{name: None if getattr(r, name) is None else
                                 grow(getattr(r, name)) for name in r.__dataclass_fields__})
                   for r in self.relax]
        return ForwardBounds([grow(z) for z in self.zl], [grow(z) for z in self.zu], relaxes,
                             grow(self.infeasible))


def _interval(affine: Affine, lows: list[torch.Tensor], ups: list[torch.Tensor],
              pad: torch.Tensor):
    """Interval bounds of the affine value, widened by ``pad`` (D, size) for rounding."""
    lo = affine.bias.expand(lows[0].shape[0], -1).clone()
    hi = lo.clone()
    for j, m in affine.maps.items():
        mp, mn = m.clamp(min=0).T, m.clamp(max=0).T
        lo = lo + lows[j] @ mp + ups[j] @ mn
        hi = hi + ups[j] @ mp + lows[j] @ mn
    return lo - pad, hi + pad


def weighted(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|p| @ weight per row: p (r, n) or (D, r, n), weight (D, n) -> (D, r), without a copy
    of |p| (|p| = 2 p+ - p)."""
    if p.dim() == 2:
        return 2.0 * (weight @ p.clamp(min=0).T) - weight @ p.T
    w = weight[..., None]
    return (2.0 * (p.clamp(min=0) @ w) - p @ w)[..., 0]


def rounding_weights(r: Relaxation, magnitude: torch.Tensor, slack: float) -> torch.Tensor:
    """Pad per unit of |p| for one backward-substitution step p v <= W z + (intercepts),
    v = sigma(z) relaxed by ``r``, z = sum_i M_i u_i + c with ``magnitude`` (D, n) bounding
    the terms summed into z (representation error included, see Affine.magnitude). With
    |W| <= |p| s (s the largest |slope|), the rounding of W's entries, of the products
    W M_i and W c (gamma_N |W| |M| |u|, Higham, Lemma 3.1, computed or replayed) and of
    the map's own representation add up to at most slack |p| s (2 magnitude); the
    intercept dot products to slack |p| 3 max|i|; adding p into the coefficients of v to
    slack |p| max|v|. Summing these over the steps is an a-posteriori bound on the whole
    pass: each step starts from the coefficients as computed."""
    slope = torch.maximum(torch.maximum(r.sl.abs(), r.su.abs()),
                          torch.maximum(r.dl.abs(), r.du.abs()))
    icpt = torch.maximum(r.il.abs(), r.iu.abs())
    value = torch.maximum(r.bl.abs(), r.bu.abs())
    return step_pad(slope, icpt, value, magnitude, slack)


def step_pad(slope: torch.Tensor, icpt: torch.Tensor, value: torch.Tensor,
             magnitude: torch.Tensor, slack: float) -> torch.Tensor:
    """slack (2 |slope| magnitude + 3 |intercept| + |value|): the pad per unit of |p| of one
    substitution step through lines of largest |slope| ``slope`` and |intercept| ``icpt`` for
    a value bounded by ``value``, over an input whose summed terms have ``magnitude`` (the
    three parts are derived in :func:`rounding_weights`)."""
    return slack * (2.0 * slope * magnitude + 3.0 * icpt + value)


def substitute(p: torch.Tensor, lo: tuple[torch.Tensor, torch.Tensor],
               hi: tuple[torch.Tensor, torch.Tensor], offset: torch.Tensor,
               targets: dict[int, Factor], rounding: torch.Tensor
               ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One step of backward substitution for an upper bound of p v.

    ``p`` holds coefficients on v, shape (r, n) (shared by the batch) or (D, r, n); v obeys
    lo[0] w + lo[1] <= v <= hi[0] w + hi[1] ((D, n) each) and w = offset + sum_i T_i u_i.
    Returns the constant (D, r), raised by |p| @ ``rounding`` (:func:`rounding_weights`),
    and the coefficients on each u_i.
    """
    const, out = _substitute(p, lo, hi, offset, targets)
    return const + weighted(p, rounding), out


def _substitute(p, lo, hi, offset, targets):
    pp = p.clamp(min=0)
    (s_lo, i_lo), (s_hi, i_hi) = lo, hi
    if offset.dim() == 1:
        offset = offset.expand(s_hi.shape[0], -1)
    # p+ s_hi + p- s_lo = p s_lo + p+ (s_hi - s_lo); s_hi != s_lo only where the
    # relaxation is loose (unstable neurons), usually a few columns
    diff = s_hi - s_lo
    cols = torch.nonzero((diff != 0).any(0)).reshape(-1)
    if p.dim() == 2:  # factor the batch into the right-hand sides
        pn = p.clamp(max=0)
        const = (i_hi + s_hi * offset) @ pp.T + (i_lo + s_lo * offset) @ pn.T
        out = {}
        for i, t in targets.items():
            term = t.right(p * s_lo[:, None, :])
            if cols.numel():
                term = term + pp[:, cols] @ (diff[:, cols, None] * t.matrix[cols])
            out[i] = term
        return const, out
    # (D, r, n) coefficients: as few full passes over them as the algebra allows
    w = p * s_lo[:, None, :]
    if cols.numel():
        w[..., cols] += pp[..., cols] * diff[:, None, cols]
    const = (p @ i_lo[..., None] + pp @ (i_hi - i_lo)[..., None] + w @ offset[..., None])[..., 0]
    return const, {i: t.right(w) for i, t in targets.items()}


def _accumulate(coeffs: dict[int, torch.Tensor], new: dict[int, torch.Tensor]) -> None:
    for i, t in new.items():
        coeffs[i] = coeffs[i] + t if i in coeffs else t


def crown_max(dag: AffineDag, k: int, sign: float, relaxes: list[Relaxation],
               xl: torch.Tensor, xu: torch.Tensor, rows: torch.Tensor,
               record: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Upper bound of sign * z_k[rows] over the box, by backward substitution (CROWN), with
    float64 rounding accounted for (:func:`rounding_weights`; the first step's pad is
    z_k's own representation error). ``record``: filled with the coefficients on each
    activation's output B_j that the pass met, (r, n_j) or (D, r, n_j)."""
    aff = dag.pre[k - 1]
    scales = input_scales(relaxes, xl, xu, k)
    coeffs: dict[int, torch.Tensor] = {j: sign * m[rows] for j, m in aff.maps.items()}
    const = (sign * aff.bias[rows]).expand(xl.shape[0], -1)
    const = const + dag.slack * aff.magnitude(scales)[:, rows]
    for j in range(k - 1, 0, -1):
        a = coeffs.pop(j, None)
        if a is None:
            continue
        if record is not None:
            record[j] = a
        r, pre = relaxes[j - 1], dag.pre[j - 1]
        step, new = substitute(a, (r.sl, r.il), (r.su, r.iu), pre.bias,
                               {i: Factor.of(pre, i) for i in pre.maps}, r.rounding)
        const = const + step
        _accumulate(coeffs, new)
    a0 = coeffs.get(0)
    if a0 is None:
        return const
    const = const + dag.slack * weighted(a0, scales[0])
    if a0.dim() == 2:
        return const + xu @ a0.clamp(min=0).T + xl @ a0.clamp(max=0).T
    return const + (a0.clamp(min=0) @ xu[..., None] + a0.clamp(max=0) @ xl[..., None])[..., 0]


def _tighten(zl: torch.Tensor, zu: torch.Tensor, rows: torch.Tensor,
             found: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[zl, zu] intersected on ``rows`` with the bounds ``found`` (rounding accounted)."""
    cl, cu = found
    zl, zu = zl.clone(), zu.clone()
    zl[:, rows] = torch.maximum(zl[:, rows], cl)
    zu[:, rows] = torch.minimum(zu[:, rows], cu)
    return zl, zu


def forward_bounds(dag: AffineDag, xl: torch.Tensor, xu: torch.Tensor,
                   splits: list[torch.Tensor] | None = None,
                   prior: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
                   crown: bool = True, iterations: int = 0,
                   deadline: float = math.inf) -> ForwardBounds:
    """Pre-activation bounds of every activation on the boxes [xl, xu] (D, n_0).

    ``iterations`` > 0: CROWN's lower slopes and the multipliers of the split constraints
    are optimised by that many projected gradient steps (:mod:`.optimized`), per row, none
    after ``deadline`` (a time.perf_counter() value)."""
    d = xl.shape[0]
    lows, ups = [xl], [xu]
    scales = [torch.maximum(xl.abs(), xu.abs())]
    zls, zus, relaxes = [], [], []
    infeasible = torch.zeros(d, dtype=torch.bool, device=xl.device)
    for k in range(1, dag.n_acts + 1):
        aff = dag.pre[k - 1]
        magnitude = aff.magnitude(scales)
        zl, zu = _interval(aff, lows, ups, dag.slack * magnitude)
        if prior is not None:
            zl, zu = torch.maximum(zl, prior[0][k - 1]), torch.minimum(zu, prior[1][k - 1])
        act = dag.acts[k - 1]
        if crown and any(j > 0 for j in aff.maps):
            # CROWN only where the bounds can change the relaxation (sparse intermediate
            # bounds): a neuron that intervals place on one linear piece is relaxed exactly
            rows = torch.nonzero(needs_bounds(act, zl, zu).any(0)).reshape(-1)
            if rows.numel():
                zl, zu = _tighten(zl, zu, rows, (
                    -crown_max(dag, k, -1.0, relaxes, xl, xu, rows),
                    crown_max(dag, k, 1.0, relaxes, xl, xu, rows)))
        # then optimised slopes and split multipliers on the rows CROWN left unsettled; a
        # layer that reads only x has exact intervals unless splits of its own layer cut
        # the box
        own_splits = splits is not None and bool((splits[k - 1] != 0).any())
        if crown and iterations > 0 and (any(j > 0 for j in aff.maps) or own_splits):
            rows = torch.nonzero(needs_bounds(act, zl, zu).any(0)).reshape(-1)
            found = (optimized_crown(dag, k, relaxes, xl, xu, rows, splits, iterations,
                                     deadline)
                     if rows.numel() else None)
            if found is not None:
                zl, zu = _tighten(zl, zu, rows, found)
        split = splits[k - 1] if splits is not None else torch.zeros_like(zl, dtype=torch.int8)
        zl = torch.where(split > 0, zl.clamp(min=0), zl)
        zu = torch.where(split < 0, zu.clamp(max=0), zu)
        gap = zl - zu
        tol = INFEASIBLE_TOL * (1 + torch.maximum(zl.abs(), zu.abs()))
        infeasible |= (gap > tol).any(-1)
        zl, zu = torch.minimum(zl, zu), torch.maximum(zl, zu)  # rounding-level overlaps
        checked_array(zl, f"the lower pre-activation bounds of activation {k}")
        checked_array(zu, f"the upper pre-activation bounds of activation {k}")
        r = relax(dag.acts[k - 1], zl, zu, split)
        r.magnitude = magnitude
        r.rounding = rounding_weights(r, magnitude, dag.slack)
        scales.append(torch.maximum(r.bl.abs(), r.bu.abs()))
        zls.append(zl)
        zus.append(zu)
        relaxes.append(r)
        lows.append(r.bl)
        ups.append(r.bu)
    return ForwardBounds(zls, zus, relaxes, infeasible)


#: root forward bounds of the last few boxes (certification bounds the gradient and then
#: the margins of the same box)
_ROOT_CACHE: list[tuple[weakref.ref, tuple, ForwardBounds]] = []


def root_forward_bounds(dag: AffineDag, xl: torch.Tensor, xu: torch.Tensor,
                        iterations: int, deadline: float = math.inf) -> ForwardBounds:
    """Forward bounds of one box (D = 1) without splits: plain CROWN, then with
    ``iterations`` > 0 optimised with the plain bounds as the prior (CROWN's own slope
    choice is not monotone in the bounds before it, so optimised earlier layers alone could
    loosen a later one; the intersection never does). Without a deadline the result is
    remembered for the last few boxes (it is a function of the DAG, box and steps alone)."""
    key = (iterations, xl.cpu().numpy().tobytes(), xu.cpu().numpy().tobytes(), injections())
    cacheable = deadline == math.inf
    if cacheable:
        for ref, k, fwd in _ROOT_CACHE:
            if ref() is dag and k == key:
                return fwd
    fwd = forward_bounds(dag, xl, xu)
    if iterations > 0:
        fwd = forward_bounds(dag, xl, xu, prior=(fwd.zl, fwd.zu), iterations=iterations,
                             deadline=deadline)
    if cacheable:
        _ROOT_CACHE.insert(0, (weakref.ref(dag), key, fwd))
        del _ROOT_CACHE[4:]
    return fwd


@dataclass
class JacobianBound:
    upper: torch.Tensor  # (D,) bound on max ||grad c^T f||_1 over the box
    gl: torch.Tensor  # (D, n_0) bounds on the gradient itself
    gu: torch.Tensor
    scores: list[torch.Tensor] = field(default_factory=list)  # per activation, (D, n_k)


class _Adjoint:
    """The adjoint (gradient) recursion of one AffineDag for a batch of functionals c.

    Rounding: t_k = M_out,k^T c + sum_m M_mk^T y_m is computed from the DAG's maps, whose
    own error and whose products' errors are at most slack times ``magnitude[k]``
    (|t_k|'s terms: |c M_out,k| and, through the maps' column scales, max|c| col_mag and
    max|y_m| col_mag, for every m whose value reads base k, even where its computed map is
    zero); every interval and linear bound of t_k is widened by that."""

    def __init__(self, dag: AffineDag, fwd: ForwardBounds, c: torch.Tensor):
        self.dag, self.fwd = dag, fwd
        k_max = dag.n_acts
        self.users: list[list[int]] = [[] for _ in range(k_max + 1)]
        self.readers: list[list[int]] = [[] for _ in range(k_max + 1)]  # maps or scales
        for m in range(1, k_max + 1):
            for j in dag.pre[m - 1].maps:
                self.users[j].append(m)
            for j in dag.pre[m - 1].col_mag:
                self.readers[j].append(m)
        d = c.shape[0]
        self.const = [c @ dag.out.maps[k] if k in dag.out.maps else
                      torch.zeros(d, dag.sizes[k], dtype=c.dtype, device=c.device)
                      for k in range(k_max + 1)]
        c_max = c.abs().amax(-1, keepdim=True)
        self.const_magnitude = [self.const[k].abs() + c_max * dag.out.col_mag[k]
                                if k in dag.out.col_mag else self.const[k].abs()
                                for k in range(k_max + 1)]
        self.magnitude: dict[int, torch.Tensor] = {}  # k -> (D, n_k), set by interval(k)
        self.ylo: dict[int, torch.Tensor] = {}
        self.yhi: dict[int, torch.Tensor] = {}
        self.lines: dict[int, tuple[torch.Tensor, ...]] = {}  # m -> (al, bl, au, bu)
        self.rounding: dict[int, torch.Tensor] = {}  # m -> pad per unit of |p| on y_m
        self.t_bounds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def interval(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval bounds of t_k, widened for rounding (fixes ``magnitude[k]``: every
        y_m it reads is relaxed already)."""
        lo, hi = self.const[k].clone(), self.const[k].clone()
        for m in self.users[k]:
            mt = self.dag.pre[m - 1].maps[k]
            mp, mn = mt.clamp(min=0), mt.clamp(max=0)
            lo = lo + self.ylo[m] @ mp + self.yhi[m] @ mn
            hi = hi + self.yhi[m] @ mp + self.ylo[m] @ mn
        magnitude = self.const_magnitude[k]
        for m in self.readers[k]:
            y_max = torch.maximum(self.ylo[m].abs(), self.yhi[m].abs()).amax(-1, keepdim=True)
            magnitude = magnitude + y_max * self.dag.pre[m - 1].col_mag[k]
        self.magnitude[k] = magnitude
        pad = self.dag.slack * magnitude
        return lo - pad, hi + pad

    def upper(self, k: int, q: torch.Tensor | float, keep: bool = False,
              rows: torch.Tensor | None = None):
        """Upper bound of q t_k by backward substitution, rounding accounted for; q is
        (D, r, n_k) or (r, n_k), or a number s for s t_k[rows] (the rows of s times the
        identity). Needs :meth:`interval` of k first (t_k's magnitude)."""
        slack = self.dag.slack
        if isinstance(q, float):
            const = q * self.const[k][:, rows] + abs(q) * slack * self.magnitude[k][:, rows]
            coeffs = {m: q * self.dag.pre[m - 1].maps[k].T[rows] for m in self.users[k]}
        else:
            const = (q @ self.const[k][..., None])[..., 0] + weighted(
                q, slack * self.magnitude[k])
            coeffs = {m: Factor.of(self.dag.pre[m - 1], k, transposed=True).right(q)
                      for m in self.users[k]}
        kept: dict[int, torch.Tensor] = {}
        while coeffs:
            m = min(coeffs)  # adjoint order: y_m needs t_m, which needs y_m2 for m2 > m
            p = coeffs.pop(m)
            if keep:
                kept[m] = p
            al, bl, au, bu = self.lines[m]
            targets = {m2: Factor.of(self.dag.pre[m2 - 1], m, transposed=True)
                       for m2 in self.users[m]}
            step, new = substitute(p, (al, bl), (au, bu), self.const[m], targets,
                                   self.rounding[m])
            const = const + step
            _accumulate(coeffs, new)
        return (const, kept) if keep else const

    def bounds(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.interval(k)
        # Linear propagation beats intervals only through a product y_m = d_m t_m whose
        # factor t_m is not a constant (t_m is constant when nothing consumes B_m but f).
        if any(self.users[m] for m in self.users[k]):
            # the product y_k = d_k t_k is relaxed exactly where d_k is one number, whatever
            # the bounds of t_k: linear bounds only where d_k ranges over an interval (all
            # of the gradient itself, k = 0, whose bounds the final |.| chord reads)
            rows = (torch.arange(lo.shape[1], device=lo.device) if k == 0 else
                    torch.nonzero((self.fwd.relax[k - 1].dl != self.fwd.relax[k - 1].du)
                                  .any(0)).reshape(-1))
            if rows.numel():
                cl, cu = -self.upper(k, -1.0, rows=rows), self.upper(k, 1.0, rows=rows)
                lo, hi = lo.clone(), hi.clone()
                lo[:, rows] = torch.maximum(lo[:, rows], cl)
                hi[:, rows] = torch.minimum(hi[:, rows], cu)
                lo, hi = torch.minimum(lo, hi), torch.maximum(lo, hi)
        return lo, hi

    def relax_product(self, m: int, tl: torch.Tensor, tu: torch.Tensor) -> None:
        """Chords of max(dl t, du t) (above) and min(dl t, du t) (below) on [tl, tu]."""
        self.t_bounds[m] = (tl, tu)
        r = self.fwd.relax[m - 1]
        dl, du = r.dl, r.du
        hi_l, hi_u = torch.maximum(dl * tl, du * tl), torch.maximum(dl * tu, du * tu)
        lo_l, lo_u = torch.minimum(dl * tl, du * tl), torch.minimum(dl * tu, du * tu)
        width = tu - tl
        safe = torch.where(width > 0, width, 1.0)
        au = torch.where(width > 0, (hi_u - hi_l) / safe, du)
        al = torch.where(width > 0, (lo_u - lo_l) / safe, dl)
        bu, bl = hi_l - au * tl, lo_l - al * tl
        scale = torch.maximum(tl.abs(), tu.abs()) * torch.maximum(dl.abs(), du.abs())
        pad = SLACK * (1 + au.abs() + al.abs()) * scale
        self.lines[m] = (al, bl - pad, au, bu + pad)
        self.ylo[m] = torch.minimum(lo_l, lo_u) - pad
        self.yhi[m] = torch.maximum(hi_l, hi_u) + pad
        # as rounding_weights, for y_m's lines over t_m (t_m's magnitude from interval(m))
        slope = torch.maximum(al.abs(), au.abs())
        icpt = torch.maximum((bl - pad).abs(), (bu + pad).abs())
        value = torch.maximum(self.ylo[m].abs(), self.yhi[m].abs())
        self.rounding[m] = step_pad(slope, icpt, value, self.magnitude[m], self.dag.slack)


def jacobian_bound(dag: AffineDag, fwd: ForwardBounds, c: torch.Tensor,
                   scores: bool = False, norm: str = "inf") -> JacobianBound:
    """Upper bound on max_{x in box} ||grad_x c^T f(x)||_q for each row of c (D, n_out):
    q = 1 (linf inputs, ``norm`` "inf") or q = 2 (``norm`` "2"). l2 takes the smaller of
    the l1 bound (||g||_2 <= ||g||_1) and the largest l2 norm over the box of gradient
    bounds [gl, gu], sqrt(sum_i max(gl_i^2, gu_i^2)) (a convex function is largest at a
    vertex)."""
    adj = _Adjoint(dag, fwd, c)
    for m in range(dag.n_acts, 0, -1):
        tl, tu = adj.bounds(m)
        adj.relax_product(m, tl, tu)
    gl, gu = adj.bounds(0)
    gl, gu = poison("local.jacobian", gl), poison("local.jacobian", gu)
    checked_array(gl, "the lower gradient bounds")
    checked_array(gu, "the upper gradient bounds")
    abs_l, abs_u = gl.abs(), gu.abs()
    width = gu - gl
    slope = torch.where(width > 0, (abs_u - abs_l) / torch.where(width > 0, width, 1.0),
                        torch.sign(gl))
    icpt = abs_l - slope * gl
    icpt = icpt + SLACK * (1 + slope.abs()) * torch.maximum(abs_l, abs_u)
    linear, kept = adj.upper(0, slope[:, None, :], keep=True)
    # sums of n_0 nonnegative terms: relative rounding gamma_n0 < slack
    grow = 1 + dag.slack
    upper = torch.minimum(linear[:, 0] + icpt.sum(-1) * grow,
                          torch.maximum(abs_l, abs_u).sum(-1) * grow)
    if norm == "2":
        peak = torch.maximum(abs_l, abs_u)
        l2 = torch.sqrt((peak * peak).sum(-1)) * (grow + 4 * SLACK)
        upper = torch.minimum(upper, l2)
    upper = checked_array(upper * (1 + SLACK * dag.n_acts * 4), "the local Lipschitz bound",
                          nonnegative=True)
    result = JacobianBound(upper, gl, gu)
    if scores:
        for m in range(1, dag.n_acts + 1):
            r = fwd.relax[m - 1]
            if m not in kept:
                result.scores.append(torch.zeros_like(r.dl))
                continue
            al, bl, au, bu = adj.lines[m]
            tl, tu = adj.t_bounds[m]
            gap = (au - al) * 0.5 * (tl + tu) + (bu - bl)
            result.scores.append(kept[m][:, 0, :].abs() * gap * r.mixed)
    return result



def gradient_cap(dag: AffineDag, c: torch.Tensor, norm: str = "inf") -> torch.Tensor:
    """A bound on ||grad c^T f||_q (q = 1 for ``norm`` "inf", 2 for "2") that holds on every
    box (Q,), from the adjoint recursion t_j = M_out,j^T c + sum_{k>j} M_kj^T y_k,
    y_k = D_k t_k, in two forms at once:

    * elementwise, |t_j| <= |M_out,j^T c| + sum_k |M_kj|^T |y_k|, with |y_k| <= s_k |t_k|
      for an elementwise activation of largest slope s_k, and for GroupSort |y_k| at most
      the largest |t_k| of its group (D_k is a convex combination of permutations);
    * in mass, ||t_j|| <= ||M_out,j^T c|| + sum_k ||M_kj^T|| ||y_k||, with
      ||y_k|| <= s_k ||t_k|| (GroupSort: s = 1; a doubly stochastic matrix has norm 1 in
      l1 and l2); the operator norm is the max row sum of |M| for l1, the spectral norm
      (rounded up) for l2,

    each base taking the smaller of its mass and the q-norm of its elementwise bound. Taken
    on the DAG before GroupSort is rewritten as ReLUs, where it keeps GroupSort's gain of 1,
    so ``local`` never reports more than the naive product of layer norms."""
    k_max = dag.n_acts
    users = _users(dag)
    y: dict[int, torch.Tensor] = {}
    y_mass: dict[int, torch.Tensor] = {}

    def q_norm(v: torch.Tensor) -> torch.Tensor:
        return v.sum(-1) if norm == "inf" else torch.sqrt((v * v).sum(-1)) * (1 + 4 * SLACK)

    slack, readers = dag.slack, _readers(dag)
    for k in range(k_max, -1, -1):
        if k in dag.out.maps:
            t = (c @ dag.out.maps[k]).abs()
            mass = q_norm(t)
        else:
            t = torch.zeros(c.shape[0], dag.sizes[k], dtype=c.dtype, device=c.device)
            mass = torch.zeros(c.shape[0], dtype=c.dtype, device=c.device)
        if k in dag.out.col_mag:  # the maps' representation error (Affine's scales)
            extra = slack * c.abs().amax(-1, keepdim=True) * dag.out.col_mag[k]
            t, mass = t + extra, mass + q_norm(extra)
        for m in users[k]:
            a = dag.pre[m - 1].maps[k]
            t = t + y[m] @ a.abs()
            mass = mass + y_mass[m] * _operator_norm(a, norm)
        for m in readers[k]:
            pre = dag.pre[m - 1]
            t = t + slack * y[m].amax(-1, keepdim=True) * pre.col_mag[k]
            mass = mass + y_mass[m] * slack * _scale_norm(pre, k, norm)
        mass = torch.minimum(mass, q_norm(t))
        if k == 0:
            return checked_array(mass * (1 + (slack + 4 * SLACK) * (k_max + 1)),
                                 "the local gradient cap", nonnegative=True)
        op = dag.acts[k - 1]
        if isinstance(op, O.GroupSort):
            groups = torch.as_tensor(op.groups, dtype=torch.long, device=t.device)
            peak = t[:, groups].amax(-1)  # (Q, n_groups)
            y[k] = torch.zeros_like(t)
            y[k][:, groups] = peak[..., None].expand(-1, -1, groups.shape[1])
            y_mass[k] = mass
        else:
            lo, hi = O.slope_range(op)
            y[k] = t * max(abs(lo), abs(hi))
            y_mass[k] = mass * max(abs(lo), abs(hi))
    raise AssertionError("unreachable")  # pragma: no cover


def jacobian_norm_cap(dag: AffineDag) -> float:
    """A box-free bound on the l2 operator norm of the Jacobian of f: the mass form of
    :func:`gradient_cap` with ||M_out,j|| in place of ||M_out,j^T c|| (the naive product of
    layer norms along the DAG, on its merged matrices)."""
    k_max = dag.n_acts
    users = _users(dag)
    y_mass: dict[int, float] = {}
    slack, readers = dag.slack, _readers(dag)
    for k in range(k_max, -1, -1):
        mass = _operator_norm(dag.out.maps[k], "2") if k in dag.out.maps else 0.0
        if k in dag.out.col_mag:
            mass += slack * _scale_norm(dag.out, k, "2")
        for m in users[k]:
            mass += y_mass[m] * _operator_norm(dag.pre[m - 1].maps[k], "2")
        for m in readers[k]:
            mass += y_mass[m] * slack * _scale_norm(dag.pre[m - 1], k, "2")
        if k == 0:
            return mass * (1 + (slack + 4 * SLACK) * (k_max + 1))
        op = dag.acts[k - 1]
        lo, hi = (-1.0, 1.0) if isinstance(op, O.GroupSort) else O.slope_range(op)
        y_mass[k] = mass * max(abs(lo), abs(hi))
    raise AssertionError("unreachable")  # pragma: no cover


def _users(dag: AffineDag) -> list[list[int]]:
    """For each base j, the activations whose pre-activation reads it."""
    users: list[list[int]] = [[] for _ in range(dag.n_acts + 1)]
    for m in range(1, dag.n_acts + 1):
        for j in dag.pre[m - 1].maps:
            users[j].append(m)
    return users


def _readers(dag: AffineDag) -> list[list[int]]:
    """For each base j, the activations whose pre-activation has rounding scales on it
    (a superset of :func:`_users`: a map computed as zero still has an error bound)."""
    readers: list[list[int]] = [[] for _ in range(dag.n_acts + 1)]
    for m in range(1, dag.n_acts + 1):
        for j in dag.pre[m - 1].col_mag:
            readers[j].append(m)
    return readers


def _scale_norm(affine: Affine, j: int, norm: str) -> float:
    """A bound on ||E^T|| (q -> q, as :func:`_operator_norm`) for |E| <= the composed |A| of
    affine's map on base j, from its row and column scales: the largest row sum for l1,
    sqrt(largest row sum * largest column sum) for l2 (Higham, Lemma 6.6 / Hoelder)."""
    if affine.row_mag[j].numel() == 0 or affine.col_mag[j].numel() == 0:
        return 0.0
    rows, cols = float(affine.row_mag[j].max()), float(affine.col_mag[j].max())
    return rows if norm == "inf" else math.sqrt(rows * cols)


def _operator_norm(m: torch.Tensor, norm: str) -> float:
    """||M^T||: q -> q for the gradient's norm q (l1: max row sum of |M|; l2: spectral)."""
    if m.numel() == 0:
        return 0.0
    if norm == "inf":
        return float(m.abs().sum(1).max()) * (1 + m.shape[1] * 2.0**-52)
    known = _SPECTRAL.get(id(m))
    if known is not None and known[0]() is m:
        return known[1]
    from ..common.norms import spectral_norm

    value = spectral_norm(m.cpu().numpy())
    _SPECTRAL[id(m)] = (weakref.ref(m), value)
    if len(_SPECTRAL) > 4096:  # forget entries whose matrices are gone
        for key in [k for k, (ref, _) in _SPECTRAL.items() if ref() is None]:
            del _SPECTRAL[key]
    return value


#: spectral norms of the unrolled matrices (certification bounds the same DAG per sample)
_SPECTRAL: dict[int, tuple[weakref.ref, float]] = {}
