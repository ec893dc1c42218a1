"""Lower bounds of output functionals over a box: the margin certificate of ``certify``.

A sample with label y keeps its prediction on a box X when every logit difference
c_j^T f = f_y - f_j stays positive on X. :func:`margin_bounds` bounds min_{x in X} c_j^T f(x)
from below by the same bound propagation ``local`` runs for its pre-activations: CROWN's
backward substitution (Zhang et al., NeurIPS 2018, Thm. 3.2) with alpha-optimised lower
slopes (Xu et al., ICLR 2021, Sec. 3.1), and, given a time budget, best-first
branch-and-bound on unstable ReLUs whose split constraints enter through beta-CROWN
multipliers (Wang et al., NeurIPS 2021, Thm. 3.1) and the pre-activation bounds recomputed
under them (:func:`~.jacobian.forward_bounds`). The neuron to split maximises the BaBSR score
(Bunel et al., JMLR 2020, Sec. 5.1): the objective's coefficient on the neuron's upper
relaxation times that relaxation's intercept, i.e. how much of the bound's looseness the
split removes at first order.

Every bound is valid whenever the search stops: a domain's bound holds on the domain, the
open and closed domains of a query cover the box, and a query's lower bound is the smallest
over them (domains taken out to be split stay counted until their children are in). A
domain with no unstable neuron left ends the search, not proven: its bound is not tightened
further (an LP's optimum over its pattern would be a solver's word, not a proof).
Projected gradient steps on the margin look for a counterexample before branching: one
found ends the search (no bound on this box can certify the sample).
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

from ...ir.lowering import AffineDag
from ..common.devices import dot_product_arithmetic
from .bab import Domain, best_neurons, stack_domains
from .jacobian import ForwardBounds, crown_max, forward_bounds, root_forward_bounds
from .optimized import optimized_crown
from .relaxations import BRANCHABLE

#: projected gradient (signed) steps of the counterexample search at the root
ATTACK_STEPS = 20
#: alpha/beta steps per bound in split domains. Measured on mnist-net_256x2 at eps 0.03
#: (bench/certify_bab.py instances 1, 3, 5, 13): 0 steps proved none in 20 s each, 5 steps
#: proved 3 of them in 0.4-7.4 s (and instance 1 in 39 s), 20 steps only 1 in 20 s
CHILD_STEPS = 5


@dataclass
class MarginResult:
    lower: np.ndarray  # (Q,) lower bounds of c_q^T f on the box (rounded down)
    proven: bool  # every query's lower bound is above the threshold
    stopped: str
    domains: int
    elapsed: float
    root: np.ndarray  # (Q,) the bounds before any branching
    counterexample: bool = False  # a point of the box has some c_q^T f <= threshold


def objective_dag(dag: AffineDag, c: torch.Tensor) -> AffineDag:
    """``dag`` with the functionals c (r, n_out) as one more pre-activation layer
    z_{K+1} = c f (no activation follows it: only backward substitution reads it)."""
    depth, largest = dag.deeper(1, c.shape[0])
    return AffineDag([*dag.sizes, c.shape[0]], list(dag.acts), [*dag.pre, dag.out.then(c)],
                     dag.out, list(dag.sources), depth=depth, largest=largest)


def objective_lower(ext: AffineDag, fwd: ForwardBounds, xl: torch.Tensor, xu: torch.Tensor,
                    splits: list[torch.Tensor] | None, iterations: int,
                    deadline: float = math.inf,
                    record: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """(D, r) lower bounds of z_{K+1} = c f of :func:`objective_dag` over the boxes and
    splits of ``fwd``: CROWN, and with ``iterations`` > 0 the better of it and alpha/beta
    optimisation; both account for float64 rounding (the objective's map c M_out is one
    more product on the DAG: :func:`objective_dag`). ``record``: CROWN's coefficients
    (:func:`~.jacobian.crown_max`), which :func:`_branches` scores."""
    k = len(ext.pre)
    rows = torch.arange(ext.sizes[k], device=xl.device)
    low = -crown_max(ext, k, -1.0, fwd.relax, xl, xu, rows, record)
    if iterations > 0:
        padded = None if splits is None else [*splits, torch.zeros(
            (xl.shape[0], ext.sizes[k]), dtype=torch.int8, device=xl.device)]
        found = optimized_crown(ext, k, fwd.relax, xl, xu, rows, padded, iterations, deadline)
        if found is not None:
            low = torch.fmax(low, found[0])  # NaN from one side leaves the other
    return torch.where(torch.isnan(low), torch.full_like(low, -math.inf), low)


def _branches(acts: list, fwd: ForwardBounds, coeffs: dict[int, torch.Tensor],
              row: int) -> list[tuple[int, int] | None]:
    """The neuron to split in each domain for objective row ``row``: the largest BaBSR
    score p_i u_i, where p_i > 0 is the coefficient of B_i's upper relaxation in CROWN's
    bound of -z_{K+1} (``coeffs``, recorded by :func:`objective_lower`) and u_i that
    relaxation's intercept; else (every score 0) the unstable branchable neuron with the
    largest relaxation area; None: a leaf."""
    d = fwd.zl[0].shape[0]
    scores, areas = [], []
    for j, (zl, zu, r, op) in enumerate(zip(fwd.zl, fwd.zu, fwd.relax, acts, strict=True), 1):
        branchable = r.mixed if isinstance(op, BRANCHABLE) else torch.zeros_like(r.mixed)
        a = coeffs.get(j)
        score = torch.zeros_like(zl)
        if a is not None:
            pp = a[..., row, :].clamp(min=0).expand(d, -1)
            score = torch.where(branchable, (pp * r.iu).clamp(min=0), score)
        scores.append(score)
        areas.append(torch.where(branchable, (-zl * zu / (zu - zl).clamp(min=1e-300))
                                 .clamp(min=0) + 1e-300, torch.zeros_like(zl)))
    flat, area = torch.cat(scores, dim=1), torch.cat(areas, dim=1)
    flat = torch.where((flat > 0).any(1, keepdim=True), flat, area)
    return best_neurons(flat, [z.shape[1] for z in fwd.zl])


def find_counterexample(dag: AffineDag, xl: np.ndarray, xu: np.ndarray, c: np.ndarray,
                        threshold: float, steps: int = ATTACK_STEPS) -> bool:
    """Projected signed-gradient descent on every c_q^T f from the box's centre (float64):
    True when a point of the box brings some query to ``threshold`` or below. Only ever
    used to stop early: a miss proves nothing."""
    lo = torch.as_tensor(xl, dtype=torch.float64, device=dag.device).reshape(1, -1)
    hi = torch.as_tensor(xu, dtype=torch.float64, device=dag.device).reshape(1, -1)
    ct = torch.as_tensor(c, dtype=torch.float64, device=dag.device)
    x = ((lo + hi) / 2).expand(ct.shape[0], -1).clone()
    step = (hi - lo) / 4
    for _ in range(steps + 1):
        x.requires_grad_(True)
        _, out = dag.forward(x)
        values = (out * ct).sum(1)
        if bool((values <= threshold).any()):
            return True
        (grad,) = torch.autograd.grad(values.sum(), x)
        with torch.no_grad():
            x = torch.minimum(torch.maximum(x - step * grad.sign(), lo), hi)
            step = step * 0.8
    return False


class _Search:
    """Best-first search: the domain with the smallest lower bound first."""

    def __init__(self, dag: AffineDag, xl: torch.Tensor, xu: torch.Tensor, c: torch.Tensor,
                 threshold: float, iterations: int):
        self.dag, self.xl, self.xu, self.threshold = dag, xl, xu, threshold
        self.iterations = iterations
        self.ext = [objective_dag(dag, c[q:q + 1]) for q in range(c.shape[0])]
        self.heap: list[tuple[float, int, Domain]] = []
        self.counter = itertools.count()
        self.closed = [math.inf] * c.shape[0]  # smallest bound of a proven domain
        self.visited = c.shape[0]

    def push(self, dom: Domain) -> None:
        if math.isnan(dom.bound):  # no bound at all (never read as one: min() skips NaN)
            dom.bound = -math.inf
        if dom.bound > self.threshold:
            self.closed[dom.query] = min(self.closed[dom.query], dom.bound)
        else:
            heapq.heappush(self.heap, (dom.bound, next(self.counter), dom))

    def lower(self) -> np.ndarray:
        values = list(self.closed)
        for _, _, dom in self.heap:
            values[dom.query] = min(values[dom.query], dom.bound)
        return np.array(values)

    def pop_batch(self, batch: int) -> list[Domain] | None:
        """Up to ``batch`` domains with the smallest bounds, taken out of the search; None
        when one of them has nothing left to split (and is not proven): then every domain
        stays in the search, so that the result's bounds still cover the whole box."""
        popped: list[Domain] = []
        while self.heap and len(popped) < batch:
            dom = heapq.heappop(self.heap)[2]
            if dom.branch is None:
                for kept in (*popped, dom):
                    self.push(kept)
                return None
            popped.append(dom)
        return popped

    def expand(self, popped: list[Domain], deadline: float) -> None:
        """Split each popped domain on its neuron; bound the children, one batch per query."""
        children: dict[int, list[Domain]] = {}
        for dom in popped:
            for child in dom.children():
                children.setdefault(dom.query, []).append(child)
        n = self.dag.n_acts
        for q, group in children.items():
            d = len(group)
            splits, prior = stack_domains(group, n)
            xl, xu = self.xl.expand(d, -1), self.xu.expand(d, -1)
            fwd = forward_bounds(self.dag, xl, xu, splits, prior, iterations=self.iterations,
                                 deadline=deadline)
            coeffs: dict[int, torch.Tensor] = {}
            lows = objective_lower(self.ext[q], fwd, xl, xu, splits, self.iterations,
                                   deadline, coeffs)[:, 0]
            branches = _branches(self.dag.acts, fwd, coeffs, 0)
            self.visited += d
            empty, values = fwd.infeasible.tolist(), lows.tolist()
            for i, ch in enumerate(group):
                if empty[i]:  # split constraints contradict: empty domain
                    continue
                # a part's bound never needs to drop below its parent's (lows has no NaN)
                ch.bound = max(values[i], ch.bound)
                ch.zl, ch.zu = [z[i] for z in fwd.zl], [z[i] for z in fwd.zu]
                ch.branch = branches[i]
                self.push(ch)


def margin_bounds(dag: AffineDag, xl: np.ndarray, xu: np.ndarray, c: np.ndarray, *,
                  threshold: float = 0.0, time_budget: float = 0.0, iterations: int = 20,
                  batch: int = 32, max_domains: int = 200_000,
                  child_iterations: int = CHILD_STEPS,
                  progress: Callable[[dict], None] | None = None,
                  device: str | torch.device = "cpu") -> MarginResult:
    """Lower bounds of min over the box [xl, xu] of c_q^T f for every row c_q (the module
    doc); the search aims at every bound above ``threshold`` and stops when they all are,
    when a counterexample or a leaf it cannot close shows they cannot all be, or after
    ``time_budget`` seconds (0: the root bounds alone) or ``max_domains`` domains.
    ``iterations``: alpha steps per bound at the root; ``child_iterations``: alpha/beta steps
    in split domains. Bound propagation runs on ``device`` (a copy of ``dag`` there); the
    counterexample search on ``dag`` as given."""
    with dot_product_arithmetic(device):
        return _margin_bounds(dag, xl, xu, c, threshold, time_budget, iterations, batch,
                              max_domains, child_iterations, progress, device)


def _margin_bounds(dag: AffineDag, xl: np.ndarray, xu: np.ndarray, c: np.ndarray,
                   threshold: float, time_budget: float, iterations: int, batch: int,
                   max_domains: int, child_iterations: int,
                   progress: Callable[[dict], None] | None,
                   device: str | torch.device) -> MarginResult:
    start = time.perf_counter()
    host = dag
    dag = dag.to(device)
    lo = torch.as_tensor(np.asarray(xl, dtype=np.float64), device=dag.device).reshape(1, -1)
    hi = torch.as_tensor(np.asarray(xu, dtype=np.float64), device=dag.device).reshape(1, -1)
    ct = torch.as_tensor(np.atleast_2d(np.asarray(c, dtype=np.float64)), device=dag.device)
    n_q = ct.shape[0]
    deadline = start + time_budget
    fwd = root_forward_bounds(dag, lo, hi, iterations)
    coeffs: dict[int, torch.Tensor] = {}
    root = objective_lower(objective_dag(dag, ct), fwd, lo, hi, None, iterations,
                           record=coeffs)[0]
    search = _Search(dag, lo, hi, ct, threshold, child_iterations)
    sizes = dag.sizes[1:]
    for q in range(n_q):
        branch = _branches(dag.acts, fwd, coeffs, q)[0]
        search.push(Domain(q, [torch.zeros(n, dtype=torch.int8, device=dag.device)
                               for n in sizes],
                            [z[0] for z in fwd.zl], [z[0] for z in fwd.zu], float(root[q]),
                            branch))
    root_np = root.cpu().numpy().copy()

    def result(stopped: str, counterexample: bool = False) -> MarginResult:
        lower = search.lower()
        return MarginResult(lower, bool(np.all(lower > threshold)), stopped, search.visited,
                            time.perf_counter() - start, root_np, counterexample)

    if not search.heap:
        return result("proven at the root")
    if not time_budget > 0:
        return result("root bounds only (no branching)")
    if find_counterexample(host, xl, xu, np.atleast_2d(c), threshold):
        return result("counterexample found (projected gradient)", True)
    last = start
    while search.heap:
        now = time.perf_counter()
        if now > deadline:
            return result("time budget")
        if search.visited >= max_domains:
            return result("domain limit")
        if progress and now - last > 0.5:
            last = now
            progress({"elapsed": now - start, "domains": search.visited,
                      "open": len(search.heap), "lower": float(search.heap[0][0])})
        popped = search.pop_batch(batch)
        if popped is None:
            return result("a domain with nothing left to split (no unstable ReLU) is not proven")
        search.expand(popped, deadline)
    return result("proven")
