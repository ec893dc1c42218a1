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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import read_arrays
from .errors import InputError, MethodNotApplicable
from .estimators import run_estimator
from .ir import evaluate
from .ir import ops as O
from .ir.graph import Graph, Node
from .ir.passes import canonicalize


def load_data(data: str | Path, labels: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels from an .npz (arrays ``x`` and ``y``) or an .npy pair."""
    if Path(data).suffix == ".npz":
        x, y = read_arrays(data, ("x", "y"), "data")
    else:
        if labels is None:
            raise InputError(f"{data}: give the labels with --labels y.npy (or use an .npz "
                             "with arrays x and y)")
        (x,), (y,) = read_arrays(data, (), "data"), read_arrays(labels, (), "labels")
    y = np.asarray(y).reshape(-1)
    if len(x) != len(y):
        raise InputError(f"{data}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise InputError(f"{data}: no samples")
    if not np.issubdtype(y.dtype, np.integer):
        if np.all(np.mod(y, 1) == 0):
            y = y.astype(np.int64)
        else:
            raise InputError(f"{data}: labels must be integers")
    return np.asarray(x, dtype=np.float64), y.astype(np.int64)


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


def pairwise_lipschitz(graph: Graph, method: str, norm: str, n_classes: int,
                       options: dict | None = None,
                       progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Symmetric matrix of bounds L[y, j] on Lip(f_y - f_j); inf where no bound."""
    pairs = [(a, b) for a in range(n_classes) for b in range(a + 1, n_classes)]
    bounds = np.zeros((n_classes, n_classes))
    for k, (a, b) in enumerate(pairs):
        row = np.zeros(n_classes)
        row[a], row[b] = 1.0, -1.0
        result = run_estimator(with_output_row(graph, row), method, norm, **(options or {}))
        if result.upper is None:
            raise MethodNotApplicable(result.notes[-1] if result.notes else
                                      f"method {method} gave no bound")
        bounds[a, b] = bounds[b, a] = result.upper
        if progress:
            progress(k + 1, len(pairs))
    return bounds


def _ort_logits(model_path: str, x: np.ndarray) -> np.ndarray:
    from .onnx_import.fidelity import input_dtype, ort_session
    from .onnx_import.load import read_model

    model = read_model(model_path)
    session = ort_session(model)
    name, dtype = session.get_inputs()[0].name, input_dtype(model)
    return np.stack([np.asarray(session.run(None, {name: xi.astype(dtype)})[0],
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

    @property
    def correct(self) -> np.ndarray:
        return self.predictions == self.labels

    def certified(self, eps: float) -> np.ndarray:
        if eps > self.radius_cap:
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


def certify(graph: Graph, x: np.ndarray, y: np.ndarray, *, eps: float, method: str = "naive",
            norm: str = "2", options: dict | None = None,
            progress: Callable[[int, int], None] | None = None) -> Certification:
    """Certified radius of every sample from pairwise logit-difference bounds."""
    if eps < 0 or not math.isfinite(eps):
        raise InputError(f"--eps must be a finite number >= 0, got {eps}")
    x = fit_inputs(x, graph)
    n_classes = int(np.prod(graph.output_shape))
    if n_classes < 2:
        raise InputError(f"the model has {n_classes} output; certification needs class logits")
    if y.min() < 0 or y.max() >= n_classes:
        raise InputError(f"labels must be in [0, {n_classes - 1}] (got {y.min()}..{y.max()})")
    with torch.no_grad():
        logits = evaluate.run_batch(graph, torch.as_tensor(x)).reshape(len(x), -1).numpy()
    notes = []
    path = graph.meta.get("path")
    if path:
        ort_logits = _ort_logits(path, x)
        diff = float(np.max(np.abs(ort_logits - logits)))
        predictions = ort_logits.argmax(axis=1)
        notes.append("predictions are onnxruntime's")
    else:
        diff, predictions = 0.0, logits.argmax(axis=1)
        notes.append("no ONNX file: predictions from the float64 IR")
    delta = 4.0 * diff + 16.0 * 2.0**-24 * float(np.max(np.abs(logits)))
    slack = 2.0 * delta
    notes.append(f"margins reduced by {slack:.2e} for float32 evaluation error (assumed: 4x "
                 "the onnxruntime/float64 difference on the data plus 16 float32 ulps)")
    if method == "local":
        return _certify_local(graph, x, y, logits, predictions, slack, eps, norm,
                              options or {}, progress, notes)
    pair_bounds = pairwise_lipschitz(graph, method, norm, n_classes, options, progress)
    radii = np.zeros(len(x))
    margins = np.zeros(len(x))
    for i, (label, pred) in enumerate(zip(y, predictions, strict=True)):
        if pred != label:
            continue
        diffs = logits[i, label] - np.delete(logits[i], label) - slack
        lips = np.delete(pair_bounds[label], label)
        margins[i] = float(diffs.min())
        if margins[i] <= 0:
            continue
        r = np.min(np.where(lips > 0, diffs / np.where(lips > 0, lips, 1.0), np.inf))
        radii[i] = math.nextafter(float(r), 0.0) if math.isfinite(r) else math.inf
    return Certification(method, norm, eps, y, predictions, margins, radii, pair_bounds, slack,
                         notes + list(graph.notes))


def _certify_local(graph: Graph, x: np.ndarray, y: np.ndarray, logits: np.ndarray,
                   predictions: np.ndarray, slack: float, eps: float, norm: str,
                   options: dict, progress, notes: list[str]) -> Certification:
    """Per sample, local bounds on ||grad (f_y - f_j)||_1 over the linf box x +- eps: the
    prediction is certified at eps when every margin exceeds L_yj * eps, and
    min(eps, margin / L_yj) is a certified radius (the box of a smaller radius is inside)."""
    from .estimators.affine_dag import MAX_ENTRIES, build_affine_dag
    from .estimators.base import execution_margin
    from .estimators.local import local_bound
    from .estimators.region import box_from_options
    from .estimators.rounding import mul_up

    if norm != "inf":
        raise InputError("method local bounds linf boxes: use --norm inf")
    if eps <= 0:
        raise InputError("method local needs --eps > 0 (the box it bounds)")
    dag = build_affine_dag(graph, "local", int(options.get("max_entries", MAX_ENTRIES)))
    margin, _ = execution_margin(graph)
    n_classes = logits.shape[1]
    pair_bounds = np.zeros((n_classes, n_classes))
    radii = np.zeros(len(x))
    margins = np.zeros(len(x))
    for i, (label, pred) in enumerate(zip(y, predictions, strict=True)):
        if progress:
            progress(i, len(x))
        if pred != label:
            continue
        diffs = logits[i, label] - np.delete(logits[i], label) - slack
        margins[i] = float(diffs.min())
        if margins[i] <= 0:
            continue
        others = [j for j in range(n_classes) if j != label]
        c = np.zeros((len(others), n_classes))
        c[:, label] = 1.0
        c[np.arange(len(others)), others] = -1.0
        low, high, _ = box_from_options({**options, "center": x[i].reshape(-1), "eps": eps},
                                        dag.sizes[0])
        result = local_bound(dag, low, high, c, bab_time=float(options.get("bab_time", 0.0)))
        lips = np.array([mul_up(v, margin) for v in result.per_query])
        pair_bounds[label, others] = np.maximum(pair_bounds[label, others], lips)
        ratio = np.min(np.where(lips > 0, diffs / np.where(lips > 0, lips, 1.0), np.inf))
        radii[i] = eps if ratio > eps else math.nextafter(float(ratio), 0.0)
    if progress:
        progress(len(x), len(x))
    notes = notes + [f"local bounds on each sample's box x +- {eps:g} (linf); radii are "
                     "capped at eps; pair bounds shown are the largest over the samples"]
    return Certification("local", norm, eps, y, predictions, margins, radii, pair_bounds,
                         slack, notes + list(graph.notes), radius_cap=eps)
