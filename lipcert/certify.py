"""Certified radii and certified accuracy from global Lipschitz bounds.

For a classifier with logits f, label y and margin m_j = f_y(x) - f_j(x), the prediction
cannot change within r = min_j m_j / L_yj, where L_yj bounds the Lipschitz constant of the
logit difference f_y - f_j: we bound the network with one extra output row e_y - e_j, which
the canonical passes merge into the last dense layer (tighter than 2L or sqrt(2) L; Tsuzuku,
Sato, Sugiyama, NeurIPS 2018, Prop. 1 for the general margin argument). l2 radii use l2
bounds, linf radii linf bounds (for a scalar output the linf -> linf constant is
sup ||grad||_1, the dual of linf).

Floating point: the prediction is onnxruntime's (the model as it runs). Margins come from the
float64 IR forward and are reduced by 2 * delta, delta = 4 * max |onnxruntime - float64| over
the data + 16 * 2^-24 * max |logit|: an assumed bound on float32 evaluation error near the
data, stated in the notes.

Box-scoped methods (``local``) bound the gradient on K nested boxes x0 +- s_k, s_K = eps,
and certify by the integral form of the mean-value argument (:func:`shell_radius`): along
the segment from x0 to x, ||x - x0|| = r, the point at distance s lies in the box of radius
s, so |m(x) - m(x0)| <= int_0^r L(s) ds with L(s) the bound on the smallest shell holding
radius s. The gradient near x0 is usually much smaller than on the whole box, so the
radius grows (K = 1 is the plain margin / L). A method that also bounds values
(``bounds_margins``: ``local``) gives a second certificate on the same boxes: a lower bound
F > 0 of a margin on the box of radius s holds every point within s, and the integral starts
again from s with margin F (:func:`shell_radius`; :mod:`lipcert.estimators.local.margin`).

One loop serves every method (:func:`certify`): a global method bounds each pair's logit
difference once (:func:`pairwise_lipschitz`), a box-scoped one (``local``) bounds all of a
sample's pairs on its own box; both go through :func:`~lipcert.estimators.run_estimator`,
where the execution margin is applied. :func:`certified_radius` is the one place a radius is
computed, and it is written so that NaN never certifies. Every certified sample is then
attacked inside its radius (:mod:`lipcert.selfcheck`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, data_hash, header
from .data import read_arrays
from .errors import InputError, InternalCheckFailed, MethodNotApplicable
from .estimators import Bound, Estimator, get_estimator, run_estimator
from .estimators.common.region import box_from_options, parse_domain, parse_eps
from .ir import evaluate
from .ir import ops as O
from .ir.graph import Graph, Node
from .ir.passes import canonicalize
from .parallel import RayCluster, run_samples
from .rounding import add_up, mul_up, sqrt_up, up
from .selfcheck import check_boxes, check_certified, check_upper
from .soundness import checked_array, poison


def load_data(data: str | Path, labels: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels from an .npz (arrays ``x`` and ``y``) or an .npy pair."""
    if Path(data).suffix == ".npz":
        x, y = read_arrays(data, ("x", "y"), "data")
    else:
        if labels is None:
            raise InputError(f"{data}: give the labels with --labels y.npy (or use an .npz "
                             "with arrays x and y)")
        (x,), (y,) = read_arrays(data, (), "data"), read_arrays(labels, (), "labels")
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim == 0 or y.ndim > 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise InputError(f"{data}: x must be a batch of samples and y one label per sample "
                         f"(got x {x.shape}, y {y.shape})")
    y = y.reshape(-1)
    if len(x) != len(y):
        raise InputError(f"{data}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise InputError(f"{data}: no samples")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)) \
            or x.dtype == np.bool_:
        raise InputError(f"{data}: x has dtype {x.dtype}; give real numbers (float)")
    x = x.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
    if bad.size:
        raise InputError(f"{data}: {bad.size} samples contain NaN or infinite values (first: "
                         f"sample {int(bad[0])}); no radius can be certified around them")
    if np.issubdtype(y.dtype, np.integer) and y.dtype != np.bool_:
        return x, y.astype(np.int64)
    if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(np.mod(y, 1) == 0):
        return x, y.astype(np.int64)
    raise InputError(f"{data}: labels must be integers (got dtype {y.dtype})")


def fit_inputs(x: np.ndarray, graph: Graph) -> np.ndarray:
    per_sample = int(np.prod(graph.input_shape))
    if x[0].size != per_sample:
        raise InputError(f"each sample has {x[0].size} values ({x.shape[1:]}), but the model's "
                         f"input {graph.input_shape} takes {per_sample}")
    return x.reshape(len(x), *graph.input_shape)


def with_output_row(graph: Graph, row: np.ndarray) -> Graph:
    """The graph followed by the linear functional ``row`` on its flattened output."""
    nodes = list(graph.nodes)
    out, shape = graph.output, graph.output_shape
    if len(shape) != 2 or shape[0] != 1:
        nodes.append(Node(O.Reshape((1, int(np.prod(shape)))), (out,), out + "@flat",
                          (1, int(np.prod(shape))), "certify"))
        out = out + "@flat"
    nodes.append(Node(O.Dense(np.asarray(row, dtype=np.float64)[None, :], None, 1), (out,),
                      out + "@margin", (1, 1), "margin row"))
    return canonicalize(graph.with_nodes(nodes, output=out + "@margin"))


def _bound_or_raise(result: Bound, method: str) -> Bound:
    """A run that gave no bound ends certification: internal failures keep exit code 3."""
    if result.upper is None:
        reason = result.notes[-1] if result.notes else f"method {method} gave no bound"
        if result.internal_error:
            raise InternalCheckFailed(reason)
        raise MethodNotApplicable(reason)
    return result


def _pair_task(payload: dict[str, Any], k: int) -> list[float]:
    """The bound on one pair's logit difference (run in a worker, or inline)."""
    graph = with_output_row(payload["graph"], payload["rows"][k])
    # self-checked all together by the caller: one set of Jacobians serves every pair
    result = _bound_or_raise(run_estimator(graph, payload["method"], payload["norm"],
                                           self_check=False, **payload["options"]),
                             payload["method"])
    return [float(result.upper)]


def pairwise_lipschitz(graph: Graph, method: str, norm: str, n_classes: int,
                       options: dict | None = None,
                       progress: Callable[[int, int], None] | None = None,
                       self_check: bool = True, workers: int = 1,
                       cluster: RayCluster | None = None) -> np.ndarray:
    """Symmetric matrix of bounds L[y, j] on Lip(f_y - f_j) (global methods); ``workers``
    processes bound the pairs in parallel."""
    pairs, rows = _pairs_and_rows(n_classes)
    bounds = np.zeros((n_classes, n_classes))
    payload = {"graph": graph, "rows": rows, "method": method, "norm": norm,
               "options": dict(options or {})}
    finished = run_samples(_pair_task, payload, list(range(len(pairs))), workers, cluster)
    for done, (k, (upper,), _, _) in enumerate(finished, 1):
        a, b = pairs[k]
        bounds[a, b] = bounds[b, a] = poison("certify.pair_bound", upper)
        if progress:
            progress(done, len(pairs))
    check_pair_bounds(graph, method, norm, bounds, self_check)
    return bounds


def pairs_from_global(graph: Graph, method: str, norm: str, n_classes: int,
                      options: dict | None = None, self_check: bool = True) -> np.ndarray:
    """Every pair's bound from one bound L of f: |(f_y - f_j)(x) - (f_y - f_j)(x')| <=
    ||e_y - e_j||_q ||f(x) - f(x')||_p <= ||e_y - e_j||_q L ||x - x'|| (Hoelder, q the dual
    of the output norm: sqrt(2) in l2; in linf the output norm is linf, q = 1, factor 2).
    Tsuzuku, Sato, Sugiyama (NeurIPS 2018) certify 1-Lipschitz networks this way."""
    result = _bound_or_raise(run_estimator(graph, method, norm, self_check=self_check,
                                           **dict(options or {})), method)
    factor = sqrt_up(2.0) if norm == "2" else 2.0
    value = mul_up(poison("certify.pair_bound", float(result.upper)), factor)
    bounds = np.full((n_classes, n_classes), value)
    np.fill_diagonal(bounds, 0.0)
    check_pair_bounds(graph, method, norm, bounds, self_check)
    return bounds


def _pairs_and_rows(n_classes: int) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The class pairs a < b and, for each, the output row e_a - e_b."""
    pairs = [(a, b) for a in range(n_classes) for b in range(a + 1, n_classes)]
    rows = np.zeros((len(pairs), n_classes))
    for k, (a, b) in enumerate(pairs):
        rows[k, a], rows[k, b] = 1.0, -1.0
    return pairs, rows


def check_pair_bounds(graph: Graph, method: str, norm: str, bounds: np.ndarray,
                      self_check: bool) -> None:
    """Pair bounds, computed now or read back from a checkpoint, must be numbers >= 0 (NaN
    is an internal error) and, unless the self-check is off, at least the sampled lower
    bound of each pair's logit difference."""
    checked_array(bounds, "the pairwise logit-difference bounds", nonnegative=True)
    pairs, rows = _pairs_and_rows(bounds.shape[0])
    if self_check and pairs:
        check_upper(graph, method, norm, [bounds[a, b] for a, b in pairs],
                    certificate=True, queries=rows)


def certified_radius(margins: np.ndarray, lips: np.ndarray, cap: float = math.inf) -> float:
    """min_j margins_j / lips_j, rounded down and capped at ``cap``; 0.0 unless every margin
    is a finite number > 0. A NaN or negative Lipschitz bound is an internal error.

    Every comparison is written so that NaN fails it: a NaN margin never certifies."""
    margins, lips = np.asarray(margins, dtype=np.float64), np.asarray(lips, dtype=np.float64)
    if margins.size == 0 or not (np.all(margins > 0) and np.all(np.isfinite(margins))):
        return 0.0
    checked_array(lips, "a logit-difference Lipschitz bound", nonnegative=True)
    with np.errstate(divide="ignore"):
        ratios = np.where(lips > 0, margins / np.where(lips > 0, lips, 1.0), math.inf)
    ratio = float(ratios.min())
    if ratio > cap:
        return cap
    if not ratio > 0:
        return 0.0
    return math.nextafter(ratio, 0.0) if math.isfinite(ratio) else math.inf


#: nested boxes per sample for box-scoped methods (radii eps k / K)
DEFAULT_SHELLS = 8


def shell_radii(eps: float, shells: int) -> list[float]:
    """The nominal radii eps k / K of the nested boxes (the last exactly eps)."""
    return [eps * k / shells for k in range(1, shells)] + [eps]


def held_radius(center: np.ndarray, low: np.ndarray, high: np.ndarray,
                domain: tuple[float, float] | None) -> float:
    """The largest s (rounded down) such that every real point of the domain within linf
    distance s of ``center`` lies in the float box [low, high]: a side clipped to the
    domain holds all of it; any other side holds its distance to the centre."""
    room = [np.nextafter(center - low, 0.0), np.nextafter(high - center, 0.0)]
    if domain is not None:  # a side clipped at the domain's edge holds every domain point
        room[0] = np.where(low <= domain[0], np.inf, room[0])
        room[1] = np.where(high >= domain[1], np.inf, room[1])
    value = float(min(room[0].min(), room[1].min()))
    return value if value >= 0 else 0.0  # NaN cannot occur (finite inputs); never < 0


def shell_radius(margins: np.ndarray, radii: np.ndarray, lips: np.ndarray,
                 cap: float, floors: np.ndarray | None = None) -> float:
    """Certified radius from gradient bounds on nested boxes (the module doc's integral)
    and, where given, lower bounds of the margins on those boxes.

    ``radii`` (K,) increasing: the gradient of pair j's logit difference is bounded by
    ``lips[k, j]`` on every point within radius radii[k] (the last box, radius ``cap``,
    holds the segment from the sample to any point of it). The decrease of margin j at
    distance r is at most F_j(r) = sum over shells of (min(r, s_k) - s_{k-1})^+ L_kj, a
    piecewise-linear function, evaluated rounded up; the radius is the largest r <= cap
    (rounded down) with F_j(r) < margins_j for every j, or ``cap`` when F_j(cap) is below
    every margin. ``floors[k, j]`` > 0 (already reduced by the evaluation slack): margin j
    is at least that on box k, so every point within s_k keeps the label and the integral
    may start again from s_k with that margin (the point at distance s_k on the segment
    lies in box k); a floor on the last box gives ``cap``. Pair j's radius is the best of
    these starts. 0.0 unless every margin is a finite number > 0; NaN or negative bounds
    are internal errors, a NaN floor is no floor. K = 1 without floors is the plain
    min_j margins_j / L_j."""
    margins = np.asarray(margins, dtype=np.float64)
    lips = checked_array(np.asarray(lips, dtype=np.float64).reshape(len(radii), -1),
                         "a logit-difference gradient bound", nonnegative=True)
    if margins.size == 0 or not (np.all(margins > 0) and np.all(np.isfinite(margins))):
        return 0.0
    floors = np.zeros_like(lips) if floors is None else np.asarray(
        floors, dtype=np.float64).reshape(lips.shape)
    floors = np.where(floors > 0, floors, 0.0)  # NaN fails: no floor
    # a shell's box lies inside the next one's: its bounds are at least as good as every
    # outer box's
    lips = np.minimum.accumulate(lips[::-1], axis=0)[::-1]
    floors = np.maximum.accumulate(floors[::-1], axis=0)[::-1]
    edges = [0.0] + [float(r) for r in radii]
    radius = cap
    for j, margin in enumerate(margins):
        best = _integral_radius(float(margin), edges, lips[:, j], 0, cap)
        for k in np.flatnonzero(floors[:, j] > 0):
            best = max(best, _integral_radius(float(floors[k, j]), edges, lips[:, j],
                                              int(k) + 1, cap))
        radius = min(radius, best)
    if not radius < cap:
        return cap
    return radius if radius > 0 else 0.0


def _integral_radius(margin: float, edges: list[float], lips: np.ndarray, first: int,
                     cap: float) -> float:
    """The largest r in [edges[first], cap] (rounded down) with margin - int from
    edges[first] to r of the shells' gradient bounds > 0, or ``cap`` when the whole
    integral stays below the margin (``margin`` > 0 holds up to edges[first])."""
    spent = 0.0  # the integral up to edges[k], rounded up
    for k in range(first, len(lips)):
        lip = float(lips[k])
        step = add_up(spent, mul_up(up(edges[k + 1] - edges[k]), lip))
        if step < margin:
            spent = step
            continue
        if not lip > 0:  # reached by rounding alone: the integral at edges[k] is below
            return edges[k]
        # margin reached inside shell k: edges[k] + (margin - spent) / lip, checked
        r = edges[k] + (margin - spent) / lip
        for _ in range(4):
            if not r > edges[k] or add_up(spent, mul_up(up(r - edges[k]), lip)) < margin:
                break
            r = math.nextafter(r, 0.0) * (1 - 1e-15)
        if not (r > edges[k] and add_up(spent, mul_up(up(r - edges[k]), lip)) < margin):
            r = edges[k]  # the integral at edges[k] = spent < margin
        return r
    return cap


class _Onnxruntime:
    """The model as it runs: onnxruntime logits and predictions for batches of inputs."""

    def __init__(self, model_path: str):
        from .onnx_import.fidelity import input_dtype, ort_session
        from .onnx_import.load import read_model

        model = read_model(model_path)
        self.session = ort_session(model)
        spec = self.session.get_inputs()[0]
        self.name, self.dtype = spec.name, input_dtype(model)
        # a symbolic leading dim (exported dynamic batch) lets samples run together
        self.batched = bool(spec.shape) and not isinstance(spec.shape[0], int)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Logits (n, n_out) for samples x (n, *input_shape) with a leading batch dim of 1."""
        if self.batched and x.ndim >= 2 and x.shape[1] == 1:
            chunks = [self.session.run(None, {self.name: x[i:i + 256, 0].astype(self.dtype)})[0]
                      for i in range(0, len(x), 256)]
            out = np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks])
            if out.shape[0] == len(x):
                return out.reshape(len(x), -1)
        return np.stack([np.asarray(self.session.run(None, {self.name: xi.astype(self.dtype)})[0],
                                    dtype=np.float64).reshape(-1) for xi in x])


@dataclass
class Certification:
    method: str
    norm: str
    eps: float
    labels: np.ndarray
    predictions: np.ndarray
    margins: np.ndarray  # float64 margin to the runner-up, already reduced by the slack
    radii: np.ndarray
    pair_bounds: np.ndarray
    slack: float
    notes: list[str] = field(default_factory=list)
    radius_cap: float = math.inf  # local bounds hold on the eps box only: radii <= eps
    shells: int = 1  # nested boxes per sample (box-scoped methods)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    def certified(self, eps: float) -> np.ndarray:
        if not eps <= self.radius_cap:
            return np.zeros_like(self.correct)
        at_cap = self.radii >= self.radius_cap  # the ratio exceeded the cap strictly
        if eps > 0:
            return self.correct & ((self.radii > eps) | at_cap)
        return self.correct & (self.radii > 0)

    def certified_accuracy(self, eps: float) -> float:
        return float(self.certified(eps).mean())

    @property
    def clean_accuracy(self) -> float:
        return float(self.correct.mean())

    def summary(self, eps_list: list[float]) -> dict[str, Any]:
        radii = np.where(self.correct, self.radii, 0.0)
        return {
            "samples": int(len(self.labels)),
            "clean_accuracy": self.clean_accuracy,
            "eps": self.eps,
            "certified_accuracy": self.certified_accuracy(self.eps),
            "certified_accuracy_at": {f"{e:g}": self.certified_accuracy(e) for e in eps_list
                                      if e <= self.radius_cap},
            "radius_percentiles": {f"p{q}": float(np.percentile(radii, q))
                                   for q in (0, 10, 25, 50, 75, 90, 100)},
        }


def _check_method(method: str, norm: str) -> Estimator:
    """Refuse, before any work, a method that cannot certify with this norm, and say why."""
    estimator = get_estimator(method)
    if not estimator.certificate:
        raise InputError(f"method {method} cannot certify: its value is an estimate, not a "
                         "certified upper bound (a radius from it could be flipped); use "
                         "naive, gram, lipsdp or local")
    if norm not in estimator.norms:
        raise InputError(f"method {method} bounds only the "
                         f"{', '.join('l' + n for n in estimator.norms)} norm; use --norm "
                         f"{estimator.norms[0]} or another method")
    return estimator


def _check_data(graph: Graph, x: np.ndarray, y: np.ndarray,
                domain: tuple[float, float] | None) -> tuple[np.ndarray, int]:
    """Inputs reshaped to the model's and the number of classes; InputError for anything
    that cannot be certified (non-finite values, labels out of range, samples off the
    domain of a box-scoped method)."""
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise InputError("the data contain NaN or infinite values")
    x = fit_inputs(x, graph)
    n_classes = int(np.prod(graph.output_shape))
    if n_classes < 2:
        raise InputError(f"the model has {n_classes} output; certification needs class logits")
    if y.min() < 0 or y.max() >= n_classes:
        raise InputError(f"labels must be in [0, {n_classes - 1}] (got {y.min()}..{y.max()})")
    if domain is not None:
        flat = x.reshape(len(x), -1)
        outside = np.flatnonzero(((flat < domain[0]) | (flat > domain[1])).any(axis=1))
        if outside.size:
            raise InputError(f"{outside.size} samples lie outside the domain [{domain[0]:g}, "
                             f"{domain[1]:g}] (first: sample {int(outside[0])}); a box clipped "
                             "to the domain would not contain them: fix the data or the domain")
    return x, n_classes


@dataclass
class _Evaluation:
    """Logits (float64 IR), predictions (onnxruntime) and the float32 slack on margins."""

    logits: np.ndarray
    predictions: np.ndarray
    slack: float
    runtime: _Onnxruntime | None
    notes: list[str]


def _evaluate(graph: Graph, x: np.ndarray) -> _Evaluation:
    with torch.no_grad():
        logits = evaluate.run_batch(graph, torch.as_tensor(x)).reshape(len(x), -1).numpy()
    logits = poison("certify.logits", logits)
    path = graph.meta.get("path")
    runtime = _Onnxruntime(path) if path else None
    if runtime is not None:
        run_logits, notes = runtime.logits(x), ["predictions are onnxruntime's"]
    else:
        run_logits, notes = logits, ["no ONNX file: predictions from the float64 IR"]
    finite = np.isfinite(logits).all(axis=1) & np.isfinite(run_logits).all(axis=1)
    if not finite.all():
        notes.append(f"{int((~finite).sum())} samples have non-finite logits: not certified")
    predictions = np.where(finite, np.nan_to_num(run_logits).argmax(axis=1), -1)
    diff = float(np.max(np.abs(run_logits - logits)[finite])) if finite.any() else 0.0
    top = float(np.max(np.abs(logits[finite]))) if finite.any() else 0.0
    slack = 2.0 * (4.0 * diff + 16.0 * 2.0**-24 * top)
    notes.append(f"margins reduced by {slack:.2e} for float32 evaluation error (assumed: 4x "
                 "the onnxruntime/float64 difference on the data plus 16 float32 ulps)")
    return _Evaluation(logits, predictions, slack, runtime, notes)


def _sample_task(payload: dict[str, Any], i: int) -> list[float]:
    """The bounds on one sample's logit differences over its nested boxes, shell-major (run
    in a worker)."""
    label = int(payload["y"][i])
    lips, floors = _shell_bounds(payload["graph"], payload["method"], payload["norm"],
                                 payload["x"][i], payload["eps"], payload["shells"], label,
                                 payload["n_classes"], payload["options"],
                                 payload["margins_of"][i], payload["slack"],
                                 payload["margin_bounds"])
    return [float(v) for v in lips.reshape(-1)] + [float(v) for v in floors.reshape(-1)]


def certify(graph: Graph, x: np.ndarray, y: np.ndarray, *, eps: float, method: str = "naive",
            norm: str = "2", options: dict | None = None,
            progress: Callable[[int, int], None] | None = None,
            self_check: bool = True, workers: int = 1,
            checkpoint: str | Path | None = None, resume: bool = False,
            ray: str | None = None, pair_bounds: str = "each",
            shells: int | None = None, margin_bounds: bool = True) -> Certification:
    """Certified radius of every sample from logit-difference bounds (see the module doc).

    ``workers`` > 1 bounds the samples' boxes (box-scoped methods) in that many processes;
    ``checkpoint`` appends every finished sample to a JSONL file and ``resume`` skips the
    samples already in it (see :mod:`lipcert.checkpoint`); ``ray`` ("auto", an address or
    "local") runs that work as tasks on a Ray cluster instead. Radii are computed here, in
    sample order, from the per-sample bounds, whichever mode computed those.
    ``pair_bounds`` "global" (global methods) bounds f once and gives every pair
    ||e_y - e_j||_q L (:func:`pairs_from_global`) instead of bounding each pair.
    ``shells`` (box-scoped methods; default :data:`DEFAULT_SHELLS`): nested boxes per
    sample (:func:`shell_radius`); 1 bounds the eps box alone. ``margin_bounds``
    (box-scoped methods that bound margins, i.e. ``local``): also bound each logit
    difference from below on the sample's boxes (:mod:`lipcert.estimators.local.margin`), a
    second certificate that :func:`shell_radius` combines with the gradient bounds; False
    gives radii from gradient bounds alone (Lipschitz radii, to compare methods)."""
    eps = parse_eps(eps)
    estimator = _check_method(method, norm)
    options = dict(options or {})
    box_scoped = estimator.accepts_region
    if pair_bounds not in ("each", "global"):
        raise InputError(f"pair_bounds {pair_bounds!r}: expected each or global")
    if box_scoped and pair_bounds == "global":
        raise InputError(f"method {method} bounds each sample's box; --pair-bounds global is "
                         "for global methods (naive, gram, lipsdp)")
    if box_scoped and not eps > 0:
        raise InputError(f"method {method} bounds each sample's box x +- eps: give --eps > 0")
    domain = parse_domain(options.get("domain")) if box_scoped else None
    shells = _check_shells(shells, box_scoped, method)
    margin_bounds = bool(margin_bounds) and box_scoped and estimator.bounds_margins
    x, n_classes = _check_data(graph, x, y, domain)
    ev = _evaluate(graph, x)
    cap = eps if box_scoped else math.inf
    if box_scoped:
        options = {**estimator.certify_defaults, **options}
    ckpt = None if checkpoint is None else Checkpoint(checkpoint, header(
        graph.meta.get("sha256"), data_hash(x, y), method, norm, eps,
        {**{k: v for k, v in options.items() if k != "progress"},
         **({"pair_bounds": pair_bounds} if pair_bounds != "each" else {}),
         **({"shells": shells} if shells != 1 else {}),
         **({"margin_bounds": False} if box_scoped and not margin_bounds else {})}), resume)
    cluster = None
    try:
        if ray is not None:
            cluster = RayCluster(ray, num_cpus=workers if workers > 1 else None)
        return _certify_samples(graph, x, y, eps, method, norm, options, progress, self_check,
                                (workers, cluster), ckpt, ev, n_classes, box_scoped, cap,
                                domain, pair_bounds, shells, margin_bounds)
    finally:
        if ckpt is not None:
            ckpt.close()
        if cluster is not None:
            cluster.close()


def _check_shells(shells: int | None, box_scoped: bool, method: str) -> int:
    """The number of nested boxes: DEFAULT_SHELLS for box-scoped methods, 1 otherwise."""
    if shells is None:
        return DEFAULT_SHELLS if box_scoped else 1
    if isinstance(shells, bool) or not isinstance(shells, (int, np.integer)) or shells < 1:
        raise InputError(f"shells {shells!r}: give a whole number >= 1")
    if shells > 1 and not box_scoped:
        raise InputError(f"--shells is for box-scoped methods (local); {method} bounds the "
                         "whole input space once")
    return int(shells)


def _margins(ev, y: np.ndarray, n_classes: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """Each sample's margin (0 when misclassified) and, for the samples with a margin > 0,
    their reduced logit differences to every other class."""
    margins = np.zeros(len(y))
    diffs_of: dict[int, np.ndarray] = {}
    for i, (label, pred) in enumerate(zip(y, ev.predictions, strict=True)):
        if pred != label:
            continue
        others = _others(label, n_classes)
        diffs = ev.logits[i, label] - ev.logits[i, others] - ev.slack
        margins[i] = float(diffs.min()) if np.all(np.isfinite(diffs)) else -math.inf
        if margins[i] > 0:  # NaN fails
            diffs_of[i] = diffs
    return margins, diffs_of


def _global_pair_bounds(graph, method, norm, options, progress, self_check, where, ckpt,
                        n_classes, pair_bounds_from: str) -> np.ndarray:
    """A global method's pair bounds: read back from a checkpoint (and checked as if
    computed), from one bound of f, or one bound per pair; a checkpoint records them."""
    if ckpt is not None and ckpt.pair_bounds is not None:
        bounds = ckpt.pair_bounds
        if bounds.shape != (n_classes, n_classes):
            raise InputError(f"--resume: the checkpoint's pair bounds have shape "
                             f"{bounds.shape}, the model has {n_classes} classes")
        check_pair_bounds(graph, method, norm, bounds, self_check)
        return bounds
    if pair_bounds_from == "global":
        bounds = pairs_from_global(graph, method, norm, n_classes, options, self_check)
    else:
        bounds = pairwise_lipschitz(graph, method, norm, n_classes, options, progress,
                                    self_check, *where)
    if ckpt is not None:
        ckpt.add_pair_bounds(bounds)
    return bounds


def _certify_samples(graph, x, y, eps, method, norm, options, progress, self_check, where,
                     ckpt, ev, n_classes, box_scoped, cap, domain,
                     pair_bounds_from: str = "each", shells: int = 1,
                     margin_bounds: bool = False) -> Certification:
    radii = np.zeros(len(x))
    margins, diffs_of = _margins(ev, y, n_classes)
    by_margin = 0  # samples whose radius the margin bounds raised
    if box_scoped:
        lips_of = _box_bounds_of(graph, x, y, eps, method, norm, options, n_classes,
                                 sorted(diffs_of), where, ckpt, progress, diffs_of, shells,
                                 ev.slack, margin_bounds)
        pair_bounds = np.zeros((n_classes, n_classes))
    else:
        pair_bounds = _global_pair_bounds(graph, method, norm, options, progress, self_check,
                                          where, ckpt, n_classes, pair_bounds_from)
    boxes: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for i, diffs in diffs_of.items():  # in sample order, whatever order workers finished in
        label = int(y[i])
        others = _others(label, n_classes)
        if box_scoped:
            values = np.asarray(lips_of[i], dtype=np.float64).reshape(2, shells, len(others))
            pair_bounds[label, others] = np.maximum(pair_bounds[label, others], values[0, -1])
            radii[i], raised = _box_radius(x[i], label, others, n_classes, diffs, values,
                                           eps, options, domain, ev.slack, boxes)
            by_margin += raised
        else:
            radii[i] = certified_radius(diffs, pair_bounds[label, others], cap)
    notes = list(ev.notes)
    workers, cluster = where
    if pair_bounds_from == "global":
        notes.append(f"pair bounds from one {method} bound L of f: "
                     f"||e_y - e_j||_{'2' if norm == '2' else '1'} L = "
                     f"{'sqrt(2)' if norm == '2' else '2'} L for every pair "
                     "(--pair-bounds each bounds each pair, usually tighter)")
    what = "sample boxes" if box_scoped else "pair bounds"
    if cluster is not None:
        notes.append(f"{what} computed as Ray tasks ({cluster.cpus} CPUs in the cluster)")
    elif workers > 1:
        notes.append(f"{what} computed by {workers} worker processes")
    if box_scoped:
        if ckpt is not None and ckpt.resumed:
            notes.append(f"{ckpt.resumed} samples read back from the checkpoint {ckpt.path}")
        notes.append(f"{method} bounds on each sample's box x +- {eps:g} (linf); radii are "
                     "capped at eps; pair bounds shown are the largest over the samples")
        if margin_bounds:
            notes.append(f"margin bounds (bound propagation on each logit difference over "
                         f"the sample's boxes, minus the slack) raised {by_margin} of "
                         f"{len(diffs_of)} radii; --no-margin-bounds gives gradient-bound "
                         "(Lipschitz) radii alone")
        if shells > 1:
            notes.append(f"radii from {shells} nested boxes x +- eps k/{shells} (the margin's "
                         "decrease is at most the integral of the gradient bound over the "
                         "distance; docs/ARCHITECTURE.md)")
    cert = Certification(method, norm, eps, y, ev.predictions, margins, radii, pair_bounds,
                         ev.slack, notes + list(graph.notes), radius_cap=cap, shells=shells)
    if self_check:
        _self_check(graph, cert, x, ev.runtime, boxes, domain)
    else:
        cert.notes.append("soundness self-check skipped (--no-self-check): certified samples "
                          "were not attacked")
    return cert


def _box_radius(x: np.ndarray, label: int, others: np.ndarray, n_classes: int,
                diffs: np.ndarray, values: np.ndarray, eps: float, options: dict, domain,
                slack: float, boxes: list) -> tuple[float, bool]:
    """One sample's radius from its gradient bounds and margin floors ``values`` (2,
    shells, pairs) and whether the floors raised it; appends its boxes, bounds and floors
    (before the slack; -inf: none) to ``boxes`` for the self-check."""
    lips, floors = values[0], values[1]
    shell_boxes = [_box(x, r, options) for r in shell_radii(eps, len(lips))]
    held = [held_radius(x.reshape(-1), lo, hi, domain) for lo, hi in shell_boxes]
    held[-1] = eps  # the eps box holds the segment to any of its points
    held = np.minimum.accumulate(np.array(held)[::-1])[::-1]
    for (lo, hi), row, floor in zip(shell_boxes, lips, floors, strict=True):
        boxes.append((lo, hi, _queries(label, others, n_classes), row,
                      np.where(floor > 0, floor + slack, -np.inf)))
    cap = eps
    radius = shell_radius(diffs, held, lips, cap, floors)
    return radius, bool(radius > shell_radius(diffs, held, lips, cap))


def _self_check(graph: Graph, cert: Certification, x: np.ndarray,
                runtime: _Onnxruntime | None, boxes: list, domain) -> None:
    """Box bounds against their boxes' centres and corners; certified samples attacked."""
    if boxes:
        cert.details["box_check"] = check_boxes(
            graph, cert.method, cert.norm, [(lo, hi) for lo, hi, *_ in boxes],
            np.stack([b[2] for b in boxes]), np.stack([b[3] for b in boxes]),
            floors=np.stack([b[4] for b in boxes]))

    def predict(pts: np.ndarray) -> np.ndarray:
        pts = pts.reshape(len(pts), *graph.input_shape)
        if runtime is not None:
            return runtime.logits(pts).argmax(axis=1)
        return evaluate.run_batch(graph, torch.as_tensor(pts)).reshape(
            len(pts), -1).numpy().argmax(axis=1)

    certified = np.where(cert.correct, np.minimum(cert.radii, cert.radius_cap), 0.0)
    cert.details["attack_check"] = check_certified(graph, x, cert.labels, certified, cert.norm,
                                                   predict, domain)
    cert.notes.append(f"soundness self-check: {cert.details['attack_check']['attacked']} "
                      "certified samples attacked inside their radius with onnxruntime, "
                      "none flipped")


def _box_bounds_of(graph, x, y, eps, method, norm, options, n_classes, todo: list[int],
                   where: tuple, ckpt, progress, margins_of: dict[int, np.ndarray],
                   shells: int = 1, slack: float = 0.0,
                   margin_bounds: bool = False) -> dict[int, list[float]]:
    """Per-sample bounds for the samples ``todo``: from the checkpoint where it has them,
    the others computed (in ``workers`` processes) and appended to it as they finish."""
    wanted = set(todo)
    found = {} if ckpt is None else {i: b for i, b in ckpt.samples.items() if i in wanted}
    for i, bounds in found.items():  # per shell and other class: a gradient bound, then
        # a margin floor (0: none), each >= 0
        if len(bounds) != 2 * shells * (n_classes - 1):
            raise InputError(f"--resume: the checkpoint holds {len(bounds)} bounds for sample "
                             f"{i}; {shells} shells of a model with {n_classes} classes need "
                             f"{2 * shells * (n_classes - 1)} (written by another lipcert "
                             "version? start a new checkpoint)")
    if ckpt is not None:
        ckpt.resumed = len(found)
    missing = [i for i in todo if i not in found]
    payload = {"graph": graph, "x": x, "y": y, "eps": eps, "method": method, "norm": norm,
               "options": options, "n_classes": n_classes, "margins_of": margins_of,
               "shells": shells, "slack": slack, "margin_bounds": margin_bounds}
    if progress:
        progress(len(found), len(todo))
    for i, bounds, seconds, worker in run_samples(_sample_task, payload, missing, *where):
        found[i] = bounds
        if ckpt is not None:
            ckpt.add_sample(i, bounds, seconds, worker)
        if progress:
            progress(len(found), len(todo))
    return found


def _others(label: int, n_classes: int) -> np.ndarray:
    return np.array([j for j in range(n_classes) if j != label])


def _queries(label: int, others: np.ndarray, n_classes: int) -> np.ndarray:
    c = np.zeros((len(others), n_classes))
    c[:, label] = 1.0
    c[np.arange(len(others)), others] = -1.0
    return c


def _box(x: np.ndarray, eps: float, options: dict) -> tuple[np.ndarray, np.ndarray]:
    low, high, _ = box_from_options({**options, "center": x.reshape(-1), "eps": eps}, x.size)
    return low, high


def _box_bounds(graph: Graph, method: str, norm: str, x: np.ndarray, eps: float, label: int,
                others: np.ndarray, n_classes: int, options: dict,
                targets: np.ndarray | None = None) -> np.ndarray:
    """Bounds on ||grad (f_y - f_j)|| over the sample's box x +- eps, one per other class j
    (checked for all samples together afterwards). ``targets``: the bounds the certificate
    needs (the method may stop refining once they are met)."""
    c = _queries(label, others, n_classes)
    region = {**options, "center": x.reshape(-1), "eps": eps, "queries": c}
    if targets is not None and get_estimator(method).takes_targets:
        region["targets"] = np.asarray(targets, dtype=np.float64)
    result = _bound_or_raise(run_estimator(graph, method, norm, self_check=False, **region),
                             method)
    lips = result.per_query if result.per_query is not None else [result.upper] * len(others)
    return checked_array(np.array([poison("certify.pair_bound", v) for v in lips],
                                  dtype=np.float64), "a local logit-difference bound",
                         nonnegative=True)


def _margin_floors(graph: Graph, method: str, x: np.ndarray, eps: float, label: int,
                   others: np.ndarray, n_classes: int, options: dict, slack: float,
                   seconds: float) -> np.ndarray:
    """Lower bounds of the sample's logit differences on its box x +- eps, minus ``slack``
    and rounded down, where positive (else 0: no floor); ``seconds`` of branch-and-bound
    aiming at every one above the slack."""
    low, high = _box(x, eps, options)
    result = get_estimator(method).margin_lower_bounds(
        graph, low, high, _queries(label, others, n_classes), threshold=slack,
        time_budget=seconds, **options)
    lower = np.nextafter(np.asarray(result.lower, dtype=np.float64) - slack, -np.inf)
    return np.where(lower > 0, lower, 0.0)  # NaN: no floor


def _shell_bounds(graph: Graph, method: str, norm: str, x: np.ndarray, eps: float,
                  shells: int, label: int, n_classes: int, options: dict,
                  margins: np.ndarray, slack: float = 0.0,
                  margin_bounds: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Gradient bounds and margin floors, each (shells, pairs), on the sample's nested boxes
    x +- eps k / shells (floors: :func:`_margin_floors`, zero without ``margin_bounds``).

    Every box gets its root bounds (bab_time 0), the eps box first: a sample they certify
    alone needs no inner box (they get its bounds). With a budget ``bab_time`` T > 0 and the
    sample not yet certified, the eps box's margin bounds get branch-and-bound first, for
    as much of T as they need: they certify the sample outright, and stop as soon as they
    do or a counterexample shows they cannot. The time left refines gradient bounds one box
    at a time, the box whose share of the binding pairs' integral (:func:`shell_radius`) is
    largest first, for a share of the time left proportional to it; its targets ask each
    pair j for the reduction F_j would need if every box were reduced alike (L_kj m_j /
    F_j), recomputed after each box, and it stops as soon as the sample is certified."""
    others = _others(label, n_classes)
    radii = shell_radii(eps, shells)
    budget = float(options.get("bab_time", 0.0))
    deadline = time.perf_counter() + budget
    root_options = {**options, "bab_time": 0.0}
    floors = np.zeros((shells, len(others)))
    outer = _box_bounds(graph, method, norm, x, eps, label, others, n_classes, root_options)
    margins = np.asarray(margins, dtype=np.float64)

    def done() -> tuple[np.ndarray, np.ndarray]:
        # each inner box lies in the eps box, so the eps box's bounds stand for theirs
        return np.tile(outer, (shells, 1)), np.tile(floors[-1], (shells, 1))

    if np.all(eps * outer < margins):  # NaN fails
        return done()  # certified by the eps box alone: the radius is eps
    if margin_bounds:
        # with a budget the search stops at once where the root bounds already certify
        floors[-1] = _margin_floors(graph, method, x, eps, label, others, n_classes,
                                    options, slack, budget)
        if np.all(floors[-1] > 0):
            return done()
    lips = np.tile(outer, (shells, 1))
    for k, r in enumerate(radii[:-1]):  # one box at a time: its forward bounds serve both
        lips[k] = _box_bounds(graph, method, norm, x, r, label, others, n_classes,
                              root_options)
        if margin_bounds:
            floors[k] = _margin_floors(graph, method, x, r, label, others, n_classes,
                                       options, slack, 0.0)
    if not budget > 0:
        return lips, floors
    widths = np.diff([0.0] + radii)[:, None]
    todo = list(range(shells))
    while todo:
        lips = np.minimum.accumulate(lips[::-1], axis=0)[::-1]
        total = (widths * lips).sum(axis=0)  # F_j(eps), nominal
        binding = ~(total < margins)
        left = deadline - time.perf_counter()
        if not binding.any() or not left > 0:
            break
        share = (widths * lips)[:, binding] / margins[binding]
        weight = share.max(axis=1)
        k = max(todo, key=lambda s: weight[s])
        todo.remove(k)
        seconds = left * weight[k] / max(weight[todo + [k]].sum(), 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):  # total > 0 where binding
            targets = np.where(binding, lips[k] * margins / total * (1 - 1e-9), lips[k])
        refined = _box_bounds(graph, method, norm, x, radii[k], label, others, n_classes,
                              {**options, "bab_time": seconds}, targets)
        lips[k] = np.minimum(lips[k], refined)
    return lips, floors
