"""The ``local`` estimator: local linf or l2 Lipschitz bounds on a box by Clarke-Jacobian
bound propagation with branch-and-bound (Shi, Wang, Zhang, Kolter, Hsieh, NeurIPS 2022).

The box is x0 +- eps in linf (``--input``/``--eps``), optionally clipped to a data range
(``domain``); without a point it is the domain itself (default [-1, 1]^n). In linf the value
bounds
    max_j max_{x in box} max_{G in dC f_j(x)} ||G||_1,
the linf -> linf Lipschitz constant of f on the box, and certifies |f_j(x) - f_j(x')| <=
L ||x - x'||_inf for x, x' in the box. In l2 each row's ||G||_2 is bounded instead and the
Jacobian's operator norm by the l2 norm of the rows' bounds (||J||_2 <= ||J||_F), capped by
the layer-norm product; the box holds the l2 ball of radius eps. :func:`local_bound` also
bounds any functional c^T f (a logit difference for certification). Pre-activation bounds
use alpha-CROWN slopes and, inside branch-and-bound, beta-CROWN multipliers of the split
constraints (``optimize_steps``; :mod:`.optimized`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...errors import InputError, MethodNotApplicable
from ...ir import ops as O
from ...ir.graph import Graph
from ...ir.lowering import MAX_OPS, UNROLLABLE, AffineDag, cached_affine_dag
from ...ir.sorting_networks import cached_expansion
from ..base import Bound, Estimator, get_estimator, register
from ..common.devices import dot_product_arithmetic
from ..common.region import box_from_options, nudged
from ..settings import setting
from .bab import BabResult, LocalProblem, branch_and_bound
from .jacobian import gradient_cap, jacobian_norm_cap
from .margin import CHILD_STEPS, MarginResult, margin_bounds

DEFAULT_BAB_TIME = 10.0
#: projected gradient steps of alpha/beta optimisation per pre-activation bound
DEFAULT_OPTIMIZE_STEPS = 20
#: unrolled matrix entries local accepts by default (800 MB of float64 maps; bound
#: propagation's coefficient matrices, of the same order, come on top: bench/local.py)
LOCAL_MAX_ENTRIES = 100_000_000


def gradient_norms(dag: AffineDag, x: np.ndarray, c: np.ndarray,
                   norm: str = "inf") -> np.ndarray:
    """||grad c_q^T f(x)||_1 (``norm`` "inf") or _2 for each row c_q (autograd on the
    unrolled network)."""
    xt = torch.as_tensor(x, dtype=torch.float64, device=dag.device).reshape(1, -1)
    xt.requires_grad_(True)
    _, out = dag.forward(xt)
    ct = torch.as_tensor(c, dtype=torch.float64, device=dag.device)
    norms = []
    for row in ct:
        (grad,) = torch.autograd.grad((out[0] * row).sum(), xt, retain_graph=True)
        norms.append(float(grad.abs().sum() if norm == "inf" else grad.norm()))
    return np.array(norms)


def local_bound(dag: AffineDag, low: np.ndarray, high: np.ndarray, c: np.ndarray, *,
                bab_time: float = DEFAULT_BAB_TIME, max_domains: int = 200_000,
                batch: int = 32, progress: Callable[[dict], None] | None = None,
                max_entries: int = LOCAL_MAX_ENTRIES, norm: str = "inf",
                targets: np.ndarray | None = None,
                optimize_steps: int = DEFAULT_OPTIMIZE_STEPS,
                device: str | torch.device = "cpu") -> BabResult:
    """Bound max over the box [low, high] of ||grad c_q^T f||_1 (``norm`` "inf": the
    linf Lipschitz constant of c_q^T f) or ||grad c_q^T f||_2 (``norm`` "2") for every
    row c_q of c.

    GroupSort layers of ``dag`` are bounded through their sorting networks of ReLUs, and
    every bound is capped by :func:`gradient_cap` of ``dag`` itself (where GroupSort keeps
    its gain of 1). ``bab_time`` = 0 gives the root bound (bound propagation without
    branching). ``targets``: one per row, the bounds certification needs (see
    :func:`~.bab.branch_and_bound`). ``optimize_steps``: alpha/beta-CROWN steps per
    pre-activation bound, at the root and in every domain (0: plain CROWN; see
    :mod:`.optimized`). ``device``: where bound propagation runs (a copy of the DAG there;
    the cap and the leaf LPs stay on the CPU)."""
    c = np.atleast_2d(c)
    cap = gradient_cap(dag, torch.as_tensor(c, dtype=torch.float64, device=dag.device), norm)
    problem = LocalProblem(cached_expansion(dag, "local", max_entries), low, high, c, cap,
                           norm, iterations=optimize_steps, device=device)
    with dot_product_arithmetic(device):
        return branch_and_bound(problem, time_budget=bab_time, max_domains=max_domains,
                                batch=batch, progress=progress, targets=targets)


def _progress_text(report: Callable[[str], None] | None) -> Callable[[dict], None] | None:
    """Branch-and-bound's progress events as the one text form every method reports."""
    if report is None:
        return None
    return lambda info: report(f"branch-and-bound {info['elapsed']:.0f} s, "
                               f"{info['domains']:,} domains ({info['open']:,} open), "
                               f"bound {info['upper']:.6g}")


def _global_cap(graph: Graph, norm: str) -> float:
    """The naive method's global bound before its float32 margin (the caller's bound gets
    its own), or inf where naive does not apply: a global constant bounds the local one on
    every box, and where a chain-rule relaxation on a wide box is loose it can be smaller
    (branches whose masses add up, e.g. a MaxPool's windows of several sizes)."""
    naive = get_estimator("naive")
    try:
        for node in graph.nodes:
            naive.handler(node)
        with torch.device("cpu"):  # naive's norms run on the host, whatever the default
            value = naive.compute(graph, norm).upper
    except MethodNotApplicable:
        return math.inf
    return float(value) if value is not None and value >= 0 else math.inf


@dataclass(frozen=True)
class LocalSettings:
    bab_time: float = setting(DEFAULT_BAB_TIME, "seconds of branch-and-bound (0: bound "
                                                "propagation only; inf: stop on max_domains "
                                                "or a closed gap only)", minimum=0,
                              infinite=True)
    max_domains: int = setting(200_000, "domains visited before stopping", minimum=1)
    batch: int = setting(32, "domains split per step", minimum=1)
    optimize_steps: int = setting(DEFAULT_OPTIMIZE_STEPS, "alpha/beta-CROWN steps per "
                                  "pre-activation bound (0: plain CROWN)", minimum=0)
    max_entries: int = setting(LOCAL_MAX_ENTRIES, "unrolled linear-layer matrix entries (8 bytes "
                                            "each)", minimum=1)


@register
class LocalEstimator(Estimator):
    name = "local"
    settings = LocalSettings
    deadline = ("bab_time", 0.5)
    certify_defaults = {"bab_time": 0.0}  # certify: bound propagation per sample
    takes_targets = True
    bounds_margins = True
    summary = ("local linf or l2 bound on a box (x0 +- eps): Clarke-Jacobian bound "
               "propagation with branch-and-bound (Shi et al., NeurIPS 2022)")
    norms = ("inf", "2")
    scope = "box"
    # GroupSort/MaxMin: written exactly as ReLU compare-exchanges (a sorting network); max
    # ops (MaxPool, Max/Min, ReduceMax/Min) as GroupSorts of their windows (a tournament)
    handlers = {op: None for op in (*UNROLLABLE, O.GroupSort, *MAX_OPS)}

    def margin_lower_bounds(self, graph: Graph, low: np.ndarray, high: np.ndarray,
                            c: np.ndarray, *, threshold: float, time_budget: float,
                            **options: Any) -> MarginResult:
        """Lower bounds of min over the box [low, high] of c_q^T f for each row c_q
        (:func:`~.margin.margin_bounds`; ``time_budget`` seconds of branch-and-bound aiming
        at bounds above ``threshold``), with this method's settings in ``options``."""
        settings = self.parse_settings({k: v for k, v in options.items()
                                        if k in self.settings.__dataclass_fields__})
        for node in graph.nodes:
            self.handler(node)
        dag = cached_expansion(
            cached_affine_dag(graph, self.name, settings.max_entries, max_ops=True),
            self.name, settings.max_entries)
        report = options.get("progress")
        return margin_bounds(
            dag, low, high, c, threshold=threshold, time_budget=time_budget,
            iterations=settings.optimize_steps,
            child_iterations=min(settings.optimize_steps, CHILD_STEPS), batch=settings.batch,
            max_domains=settings.max_domains, device=options.get("device", "cpu"),
            progress=None if report is None else lambda info: report(
                f"margin branch-and-bound {info['elapsed']:.0f} s, {info['domains']:,} "
                f"domains ({info['open']:,} open), worst lower bound {info['lower']:.6g}"))

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:
        max_entries = int(options.get("max_entries", LOCAL_MAX_ENTRIES))
        dag = cached_affine_dag(graph, self.name, max_entries, max_ops=True)
        low, high, region = box_from_options(options, dag.sizes[0])
        n_out = dag.out.bias.numel()
        c = np.asarray(options["queries"], dtype=np.float64) if options.get(
            "queries") is not None else np.eye(n_out)
        bab_time = float(options.get("bab_time", DEFAULT_BAB_TIME))
        center = ((low + high) / 2 if options.get("center") is None else
                  np.clip(np.asarray(options["center"], dtype=np.float64).reshape(-1), low, high))
        # the gradient near the centre is attained (moved off kinks, where autograd's
        # one-sided derivatives need not be)
        witness = nudged(center, low, high, np.random.default_rng(0))
        attained = np.nan_to_num(gradient_norms(dag, witness, c, norm), nan=0.0, posinf=0.0)
        targets = options.get("targets")
        if targets is not None:
            targets = np.asarray(targets, dtype=np.float64).reshape(-1)
            if targets.shape != (c.shape[0],):
                raise InputError(f"targets: {targets.size} values for {c.shape[0]} queries "
                                 "(one bound per query row)")
            if not np.all(attained <= targets):  # NaN fails: no branching toward a target
                bab_time = 0.0  # that an attained value already exceeds
        result = local_bound(dag, low, high, c, bab_time=bab_time,
                             max_domains=int(options.get("max_domains", 200_000)),
                             batch=int(options.get("batch", 32)),
                             progress=_progress_text(options.get("progress")),
                             max_entries=max_entries, norm=norm, targets=targets,
                             optimize_steps=int(options.get("optimize_steps",
                                                            DEFAULT_OPTIMIZE_STEPS)),
                             device=options.get("device", "cpu"))
        root, upper, exact = result.root, result.upper, result.exact
        lower = max(result.lower, float(attained.max()))
        notes = [f"local constant on the box {region['describe']}: valid only inside it"]
        if norm == "2" and options.get("queries") is None and n_out > 1:
            # the Jacobian's operator norm from its rows: ||J||_2 <= ||J||_F
            rows = result.per_query  # a sum of squares and a root: (n + 4) ulps, generous
            frobenius = math.sqrt(sum(v * v for v in rows)) * (1 + (len(rows) + 4) * 2.0**-52)
            cap = jacobian_norm_cap(dag)
            upper = min(frobenius, cap) if math.isfinite(cap) else frobenius  # NaN: no cap
            exact = False  # the rows' constants are exact at best, not the operator norm
            notes.append("l2: the Jacobian's operator norm is bounded by the l2 norm of its "
                         "rows' bounds (Frobenius), capped by the layer-norm product; the box "
                         "is the linf box, which holds the l2 ball of radius eps")
        if options.get("queries") is None:
            overall = _global_cap(graph, norm)
            if overall < upper:  # NaN fails: kept as it is
                upper, exact = overall, False
                notes.append(f"capped by the naive global bound {overall:.6g} (the product "
                             "of the layer norms holds on every box)")
        if exact:
            notes.append("branch-and-bound closed the gap: the bound is the exact local "
                         "constant (up to the LP tolerance of the leaf checks)")
        elif bab_time > 0 or targets is not None:
            notes.append(f"branch-and-bound stopped ({result.stopped}) after "
                         f"{result.domains} domains in {result.elapsed:.1f} s; root bound "
                         f"{root:.6g}")
        return Bound(method=self.name, norm=norm, upper=upper,
                     lower=lower if lower > 0 else None, scope="box", region=region,
                     notes=notes, per_query=list(result.per_query),
                     details={"root_bound": root, "per_output": result.per_query,
                              "domains": result.domains, "leaves_checked": result.leaves_checked,
                              "leaves_pruned": result.leaves_pruned, "exact": exact,
                              "stopped": result.stopped, "bab_seconds": result.elapsed,
                              "unstable_at_root": result.unstable_at_root,
                              "lower_attained": lower if lower > 0 else None})

