"""Branch-and-bound over unstable ReLU neurons for local Lipschitz bounds.

Shi et al. (NeurIPS 2022, Sec. 3.4) split an unstable neuron z into z >= 0 and z <= 0, which
fixes its Clarke derivative and tightens the relaxations after it. Here the search is
best-first over (output functional, domain) pairs, with two changes:

* after each split the forward bounds are recomputed under all of the domain's split
  constraints (interval + CROWN, intersected with the parent's bounds, and, where the first
  split shows it affordable, the constraints' beta-CROWN multipliers and alpha slopes of
  :mod:`.optimized`), so activation patterns that the constraints make impossible are
  pruned as empty domains and neurons a split decides are settled;
* a domain with no unstable neuron left has a constant gradient. Its pattern is checked by
  a linear program (box + the exact affine pre-activations of its split neurons, HiGHS):
  infeasible patterns are dropped, and one that holds with a positive margin (on an open
  set, not only on a kink) is an attained value, i.e. a lower bound. When the best open
  domain is such a leaf, the bound is exact.

The branching neuron maximises |coefficient of y = d t in the objective| times the mean gap
of the chord relaxation of y = d t over [tl, tu] (the "relaxation area" heuristic).
Stopping at any time returns the largest upper bound among open domains: always valid.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ...errors import InternalCheckFailed
from ...ir import ops as O
from ...ir.lowering import AffineDag
from ...rounding import gamma
from .jacobian import ForwardBounds, forward_bounds, jacobian_bound, root_forward_bounds

#: split domains get optimised bounds (alpha/beta) when a batch costs at most this many times
#: a batch with plain CROWN, measured on the first split; beyond it branching goes further
#: without them. Measured ratios: 4 (mnist-net_256x2, where the multipliers close the gap),
#: 19 (digits_mlp, gap closed in 1.5 s instead of open after 10 s), 56 and 122
#: (digits_resnet, digits_cnn: plain branching ends lower at equal time)
OPTIMIZE_COST_RATIO = 30.0
#: ... and when the probe fits in this share of the time budget
PROBE_SHARE = 0.1


@dataclass
class Domain:
    """A query on the box with split constraints: the searches here (an upper ``bound`` of
    the gradient norm) and in :mod:`.margin` (a lower ``bound`` of the functional)."""

    query: int
    splits: list[torch.Tensor]  # per activation, (n_k,) int8: +1 z >= 0, -1 z <= 0, 0 free
    zl: list[torch.Tensor]
    zu: list[torch.Tensor]
    bound: float
    branch: tuple[int, int] | None  # (activation, neuron) to split next; None: a leaf

    def children(self) -> list[Domain]:
        """The two domains z >= 0 and z <= 0 of the branching neuron, with this domain's
        bounds (valid on both) until they are bounded themselves."""
        act, idx = self.branch  # type: ignore[misc]
        out = []
        for side in (1, -1):
            splits = [s.clone() for s in self.splits]
            splits[act][idx] = side
            out.append(Domain(self.query, splits, self.zl, self.zu, self.bound, None))
        return out


def best_neurons(scores: torch.Tensor, sizes: list[int]) -> list[tuple[int, int] | None]:
    """For each row of ``scores`` (D, sum of ``sizes``: every activation's neurons side by
    side), the (activation, neuron) of its largest score, or None where that score is not
    positive (NaN is not). One transfer from the device, not one per row."""
    best = scores.argmax(dim=1)
    positive = (scores.gather(1, best[:, None])[:, 0] > 0).tolist()
    offsets = np.cumsum([0, *sizes])
    out: list[tuple[int, int] | None] = []
    for pos, ok in zip(best.tolist(), positive, strict=True):
        act = int(np.searchsorted(offsets, pos, side="right")) - 1
        out.append((act, pos - int(offsets[act])) if ok else None)
    return out


def stack_domains(domains: list[Domain], n_acts: int
                  ) -> tuple[list[torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """The domains' split constraints and pre-activation bounds as batches, (D, n_k) per
    activation: the ``splits`` and ``prior`` of :func:`~.jacobian.forward_bounds`."""
    def stack(field: str) -> list[torch.Tensor]:
        return [torch.stack([getattr(d, field)[k] for d in domains]) for k in range(n_acts)]

    return stack("splits"), (stack("zl"), stack("zu"))


@dataclass
class BabResult:
    upper: float
    lower: float
    per_query: list[float]
    domains: int
    leaves_checked: int
    leaves_pruned: int
    exact: bool
    stopped: str
    elapsed: float
    root: float  # the bound before any branching
    unstable_at_root: int  # neurons whose relaxation is loose on the whole box


class LocalProblem:
    """One AffineDag on one box, bounding ||grad c_q^T f||_1 for each row c_q of C."""

    def __init__(self, dag: AffineDag, xl: np.ndarray, xu: np.ndarray, c: np.ndarray,
                 cap: torch.Tensor | None = None, norm: str = "inf", iterations: int = 0,
                 device: str | torch.device = "cpu"):
        self.host_dag = dag  # the leaf LPs read its matrices (scipy, on the CPU)
        self.dag = dag.to(device)  # bound propagation runs here
        device = self.dag.device
        self.host_box = (np.asarray(xl, dtype=np.float64).reshape(-1),
                         np.asarray(xu, dtype=np.float64).reshape(-1))
        self.xl = torch.as_tensor(self.host_box[0], device=device).reshape(1, -1)
        self.xu = torch.as_tensor(self.host_box[1], device=device).reshape(1, -1)
        self.c = torch.as_tensor(np.asarray(c, dtype=np.float64), device=device).reshape(
            -1, dag.out.bias.numel())
        # a bound per query valid on every box (gradient_cap), or none
        self.cap = None if cap is None else cap.to(device)
        self.norm = norm  # "inf": ||grad||_1 is bounded; "2": ||grad||_2
        self.iterations = iterations  # alpha/beta optimisation steps per bound (optimized.py)
        self.piecewise_linear = all(isinstance(op, (O.Relu, O.LeakyRelu)) for op in dag.acts)

    def evaluate(self, queries: list[int], splits: list[torch.Tensor] | None,
                 prior: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
                 iterations: int | None = None, deadline: float = math.inf
                 ) -> tuple[ForwardBounds, torch.Tensor, list[tuple[int, int] | None]]:
        d = len(queries)
        steps = self.iterations if iterations is None else iterations
        if splits is None and prior is None:  # the root: one box for every query
            fwd = root_forward_bounds(self.dag, self.xl, self.xu, steps, deadline).expand(d)
        else:
            fwd = forward_bounds(self.dag, self.xl.expand(d, -1), self.xu.expand(d, -1),
                                 splits, prior, iterations=steps, deadline=deadline)
        jac = jacobian_bound(self.dag, fwd, self.c[queries], scores=True, norm=self.norm)
        branches: list[tuple[int, int] | None] = [None] * d
        if jac.scores:
            flat = torch.cat(jac.scores, dim=1)
            mixed = torch.cat([r.mixed for r in fwd.relax], dim=1)
            # break ties (zero gradient coefficient) by the forward relaxation's size
            area = torch.cat([(-zl * zu / (zu - zl).clamp(min=1e-300)).clamp(min=0)
                              for zl, zu in zip(fwd.zl, fwd.zu, strict=True)], dim=1)
            flat = torch.where(mixed, flat + 1e-9 * area + 1e-300, torch.zeros_like(flat))
            branches = best_neurons(flat, self.dag.sizes[1:])
        upper = jac.upper if self.cap is None else torch.minimum(jac.upper, self.cap[queries])
        upper = torch.where(fwd.infeasible, torch.full_like(upper, -np.inf), upper)
        return fwd, upper, branches

    def leaf_feasible(self, dom: Domain) -> str:
        """LP over the box: can every split neuron be on its side? (exact at a leaf)

        Maximises the margin t of the split constraints sign * z_i + t * s_i <= 0 (s_i the
        row's scale). ``"empty"`` only when the LP's optimum is negative *and* its dual
        proves it (:meth:`_proved_empty`, in float64 with the forms' rounding errors): the
        pattern is dropped. ``"interior"`` when a positive margin is feasible: the pattern
        holds on an open set, so its gradient is attained (a lower bound). ``"boundary"``:
        anything else (e.g. only on a kink hyperplane, or an LP that did not solve, or an
        emptiness the dual does not prove); its value still counts for the upper bound.
        """
        rows, rhs, scale, errors = self._leaf_constraints(dom)
        if not rows:
            return "interior"
        from scipy.optimize import linprog  # only when a leaf is checked
        n0 = self.dag.sizes[0]
        a_ub = np.hstack([np.array(rows), np.array(scale)[:, None]])
        objective = np.zeros(n0 + 1)
        objective[-1] = -1.0  # maximise t
        xl, xu = self.host_box
        bounds = [*zip(xl, xu, strict=True), (None, 1.0)]
        res = linprog(objective, A_ub=a_ub, b_ub=np.array(rhs), bounds=bounds,
                      method="highs")
        if res.status != 0 or res.x is None:  # not solved: keep it, never call it attained
            return "boundary"
        margin = float(res.x[-1])
        if margin < -1e-9:
            duals = getattr(getattr(res, "ineqlin", None), "marginals", None)
            proved = duals is not None and self._proved_empty(
                np.array(rows), np.array(rhs), np.array(errors), -np.asarray(duals))
            return "empty" if proved else "boundary"
        return "interior" if margin > 1e-9 and bool(np.all(xu > xl)) else "boundary"

    def _proved_empty(self, rows: np.ndarray, rhs: np.ndarray, errors: np.ndarray,
                      y: np.ndarray) -> bool:
        """Farkas-type certificate that no x in the box has g_i(x) = rows_i x - rhs_i <= 0
        for every i: with y >= 0 (the LP's duals, clipped), min over the box of
        sum_i y_i g_i(x) > 0, checked in float64 with its rounding (4 gamma_{m+n+4} times the
        terms' magnitude, Higham Lemma 3.1) and the forms' own errors (``errors``: bounds
        on |exact - computed| of each g_i on the box). Written so that NaN fails."""
        y = np.where(np.isfinite(y), np.maximum(y, 0.0), 0.0)
        xl, xu = self.host_box
        c = y @ rows
        value = float(np.minimum(c * xl, c * xu).sum() - y @ rhs)
        x_max = np.maximum(np.abs(xl), np.abs(xu))
        terms = float(y @ (np.abs(rows) @ x_max + np.abs(rhs)))
        pad = 4.0 * gamma(rows.shape[0] + rows.shape[1] + 4) * terms + float(y @ errors)
        return bool(value - pad > 0)

    def _leaf_constraints(self, dom: Domain) -> tuple[list, list, list, list]:
        """sign * (a x + b) <= 0 for every split neuron, as rows a, right-hand sides, row
        scales (1 + |b| + ||a||_1) and bounds on each row's rounding error over the box,
        with the affine forms of the leaf's pattern (computed in float64: each form's error
        is the DAG's slack times its terms' magnitude, from the maps' rounding scales, plus
        the errors of the forms it reads through |M|)."""
        dag = self.host_dag
        n0 = dag.sizes[0]
        x_max = np.maximum(np.abs(self.host_box[0]), np.abs(self.host_box[1]))
        forms = [(np.eye(n0), np.zeros(n0))]
        errors = [np.zeros(n0)]  # |exact - computed| of each base's form on the box
        sizes = [x_max]  # |computed form| on the box, per neuron
        rows, rhs, scale, row_errors = [], [], [], []
        for k in range(1, dag.n_acts + 1):
            aff = dag.pre[k - 1]
            a = np.zeros((dag.sizes[k], n0))
            b = aff.bias.numpy().copy()
            err = dag.slack * aff.bias_mag.numpy()
            for j, m in aff.maps.items():
                mj = m.numpy()
                a += mj @ forms[j][0]
                b += mj @ forms[j][1]
                err = err + (np.abs(mj) @ errors[j]) * (1 + dag.slack)
            for j, v in aff.row_mag.items():  # products and representation of the maps
                err = err + dag.slack * v.numpy() * float((sizes[j] + errors[j]).max())
            op = dag.acts[k - 1]
            lo, hi = dom.zl[k - 1].cpu().numpy(), dom.zu[k - 1].cpu().numpy()
            alpha = op.alpha if isinstance(op, O.LeakyRelu) else 0.0
            slope = np.where(lo >= 0, 1.0, np.where(hi <= 0, alpha, 1.0))
            split = dom.splits[k - 1].cpu().numpy()
            slope = np.where(split > 0, 1.0, np.where(split < 0, alpha, slope))
            row_scale = 1 + np.abs(b) + np.abs(a).sum(1)
            for idx in np.flatnonzero(split):
                sign = -1.0 if split[idx] > 0 else 1.0  # sign * z <= 0
                rows.append(sign * a[idx])
                rhs.append(-sign * b[idx])
                scale.append(row_scale[idx])
                row_errors.append(err[idx])
            forms.append((slope[:, None] * a, slope * b))
            size = np.abs(a) @ x_max + np.abs(b)
            errors.append(np.abs(slope) * (err + dag.slack * size))
            sizes.append(np.abs(slope) * size)
        return rows, rhs, scale, row_errors


def _infeasible(value: float) -> bool:
    """True for a domain that split constraints proved empty (bound -inf); NaN is never taken
    for an empty domain: it ends the method (the bounds are checked before they get here)."""
    if math.isnan(value):
        raise InternalCheckFailed("internal check failed: a branch-and-bound domain has a NaN "
                                  "bound; no bound printed. Please report this model")
    return value == -math.inf


class _Search:
    """The state of one best-first search: open domains (a heap on -upper, or with targets on
    -upper / target), closed leaves, the best attained value, and counters.

    With ``targets`` t_q (certification: the sample is certified when every query's bound is
    at most its t_q), a domain whose bound is already at most t_q is settled: it is kept only
    as a closed value, never split. A leaf above t_q, or a value attained above it, means
    the query cannot get below t_q by this method (``hopeless``)."""

    def __init__(self, problem: LocalProblem, n_q: int, targets: np.ndarray | None = None,
                 start: float = 0.0, time_budget: float = math.inf):
        self.problem = problem
        self.heap: list[tuple[float, int, Domain]] = []
        self.counter = itertools.count()
        self.closed = -np.inf  # largest bound of a domain that cannot be split further
        self.lower = -np.inf  # largest attained value (a feasible leaf)
        self.per_query_closed = [-np.inf] * n_q
        self.visited, self.checked, self.pruned = n_q, 0, 0
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float64)
        self.hopeless = False
        # optimisation steps for split domains: decided on the first split (None: not yet)
        self.child_steps: int | None = None if problem.iterations > 0 else 0
        self.deadline = start + time_budget  # no optimisation step after it
        self.budget = time_budget  # seconds

    def _priority(self, dom: Domain) -> float:
        if self.targets is None:
            return dom.bound
        target = self.targets[dom.query]
        return dom.bound / target if target > 0 else math.inf

    def _settle(self, dom: Domain) -> None:
        self.closed = max(self.closed, dom.bound)
        self.per_query_closed[dom.query] = max(self.per_query_closed[dom.query], dom.bound)

    def push(self, dom: Domain) -> None:
        # written so that NaN fails: only a bound proven <= its target is settled
        if self.targets is not None and dom.bound <= self.targets[dom.query]:
            self._settle(dom)
            return
        heapq.heappush(self.heap, (-self._priority(dom), next(self.counter), dom))

    def best(self) -> float:
        if self.targets is None:
            return max(-self.heap[0][0] if self.heap else -np.inf, self.closed)
        return max([dom.bound for _, _, dom in self.heap] + [self.closed])

    def gap_closed(self, rtol: float) -> bool:
        return self.lower > -np.inf and self.best() <= self.lower * (1 + rtol) + 1e-300

    def _close_leaf(self, dom: Domain) -> None:
        """A domain with no unstable neuron: LP-checked (piecewise linear) and closed."""
        if self.problem.piecewise_linear:
            self.checked += 1
            where = self.problem.leaf_feasible(dom)
            if where == "empty":
                self.pruned += 1
                return
            if where == "interior":  # the pattern holds on an open set: attained
                self.lower = max(self.lower, dom.bound)
        self._settle(dom)
        if self.targets is not None and not dom.bound <= self.targets[dom.query]:
            self.hopeless = True  # an unsplittable domain above its target

    def pop_batch(self, batch: int) -> list[Domain]:
        popped: list[Domain] = []
        while self.heap and len(popped) < batch:
            dom = heapq.heappop(self.heap)[2]
            if dom.branch is None:
                self._close_leaf(dom)
            else:
                popped.append(dom)
        return popped

    def expand(self, popped: list[Domain], sizes: list[int]) -> None:
        """Split each popped domain on its branching neuron and bound both children."""
        children = [child for dom in popped for child in dom.children()]
        stacked, prior = stack_domains(children, len(sizes))
        queries = [ch.query for ch in children]
        if self.child_steps is None:  # the first split: are optimised bounds worth it?
            t0 = time.perf_counter()
            self.problem.evaluate(queries, stacked, prior, iterations=0)
            t1 = time.perf_counter()
            # the probe costs at most RATIO plain batches and a tenth of the time budget
            cap = t1 + min(OPTIMIZE_COST_RATIO * (t1 - t0), PROBE_SHARE * self.budget)
            fwd, upper, branches = self.problem.evaluate(queries, stacked, prior,
                                                         deadline=min(cap, self.deadline))
            cheap = time.perf_counter() <= cap
            self.child_steps = self.problem.iterations if cheap else 0
        else:
            fwd, upper, branches = self.problem.evaluate(queries, stacked, prior,
                                                         iterations=self.child_steps,
                                                         deadline=self.deadline)
        self.visited += len(children)
        values = upper.tolist()
        for i, ch in enumerate(children):
            value = values[i]
            if _infeasible(value):
                continue
            ch.bound = min(value, ch.bound)  # a sub-domain's bound never needs to grow
            ch.zl = [z[i] for z in fwd.zl]
            ch.zu = [z[i] for z in fwd.zu]
            ch.branch = branches[i]
            self.push(ch)

    def per_query(self, root: list[float]) -> list[float]:
        values = list(self.per_query_closed)
        for _, _, dom in self.heap:  # the heap key is a priority: read each domain's bound
            values[dom.query] = max(values[dom.query], dom.bound)
        return [min(p, r) for p, r in zip(values, root, strict=True)]


def _stop_reason(search: _Search, start: float, time_budget: float, max_domains: int,
                 rtol: float) -> str | None:
    if search.targets is not None:
        if search.hopeless:
            return "a target is out of reach (a leaf or an attained value above it)"
    elif search.gap_closed(rtol):
        return "gap closed"
    if time_budget <= 0:
        return "root bound only (no branching)"
    if time.perf_counter() - start > time_budget:
        return "time budget"
    if search.visited >= max_domains:
        return "domain limit"
    return None


def branch_and_bound(problem: LocalProblem, *, time_budget: float, max_domains: int = 200_000,
                     batch: int = 32, rtol: float = 1e-6,
                     progress: Callable[[dict], None] | None = None,
                     targets: np.ndarray | None = None) -> BabResult:
    """Best-first branch-and-bound; returns a valid upper bound whenever it stops.

    Stops when the gap closes, after ``time_budget`` seconds (0: the root bound alone; inf:
    no time limit) or after ``max_domains`` domains, whichever comes first. With
    ``targets`` (one per query: certification asks for bound_q <= t_q) the search works on
    the domain farthest above its target first (the binding pair of the certificate), never
    splits a domain already below its target, and stops as soon as every query is below its
    target ("targets met") or one provably cannot be ("a target is out of reach")."""
    start = time.perf_counter()
    n_q = problem.c.shape[0]
    fwd, upper, branches = problem.evaluate(list(range(n_q)), None, None)
    upper = upper.tolist()
    search = _Search(problem, n_q, targets, start, time_budget)
    sizes = problem.dag.sizes[1:]
    for q in range(n_q):
        if not _infeasible(float(upper[q])):
            search.push(Domain(q, [torch.zeros(n, dtype=torch.int8, device=problem.xl.device)
                                   for n in sizes],
                               [z[q] for z in fwd.zl], [z[q] for z in fwd.zu],
                               float(upper[q]), branches[q]))
    root = [float(u) for u in upper]
    unstable = int(sum(int(r.mixed[0].sum()) for r in fwd.relax))
    stopped = "exhausted" if time_budget > 0 else "root bound only (no branching)"
    last_report = start
    while search.heap:
        reason = _stop_reason(search, start, time_budget, max_domains, rtol)
        if reason is not None:
            stopped = reason
            break
        popped = search.pop_batch(batch)
        if popped:
            search.expand(popped, sizes)
        now = time.perf_counter()
        if progress and now - last_report > 0.5:
            last_report = now
            progress({"domains": search.visited, "open": len(search.heap),
                      "elapsed": now - start, "upper": search.best(), "lower": search.lower})
    if targets is not None and search.hopeless:
        stopped = "a target is out of reach (a leaf or an attained value above it)"
    elif targets is not None and not search.heap:
        stopped = "targets met"
    per_query = search.per_query(root)
    best = max(max(per_query) if per_query else 0.0, 0.0)
    lower = search.lower
    exact = problem.piecewise_linear and lower > -np.inf and best <= lower * (1 + rtol)
    return BabResult(best, max(lower, 0.0), per_query, search.visited, search.checked,
                     search.pruned, bool(exact), stopped, time.perf_counter() - start,
                     max(max(root), 0.0), unstable)
