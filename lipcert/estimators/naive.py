"""The ``naive`` estimator: products of per-layer norms propagated along the DAG.

For every value v we keep L(v), a bound on the Lipschitz constant of the map from the model
input to v. A single-input node multiplies by its own norm; residual Add sums
(triangle inequality); Concat combines in quadrature (l2) or by max (linf); an elementwise
max/min of several inputs is bounded like a Concat. This is the textbook bound
(Szegedy et al. 2014) made sound for the whole DAG and for float rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..ir import ops as O
from ..ir.graph import Graph, Node
from ..rounding import add_up, mul_up, sqrt_up
from ..soundness import checked, poison
from .base import Bound, Estimator, cached_factor, register
from .common import norms as N


def _one(op, node, in_shape, norm):
    return 1.0, ""


def _dense(op: O.Dense, node, in_shape, norm):
    if norm == "2":
        return N.spectral_norm(op.weight), "exact SVD"
    return N.max_row_abs_sum(op.weight), "max row sum"


def _conv(op: O.Conv, node, in_shape, norm):
    if norm == "2":
        return N.conv_l2_cheap(op.weight, op.stride, op.dilation, op.groups)
    return N.conv_linf(op.weight), "max channel abs sum"


def _conv_transpose(op: O.ConvTranspose, node, in_shape, norm):
    if norm == "2":  # the adjoint of a conv with the same kernel, then a crop
        return N.conv_l2_cheap(op.weight, op.stride, op.dilation, op.groups)
    return N.conv_transpose_linf(op), "max phase abs sum"


def _pool(op, node, in_shape, norm):
    l2, linf = N.nonnegative_linear_norms(op, in_shape)
    return (l2, "Schur test") if norm == "2" else (linf, "max row sum")


def _max_pool(op: O.MaxPool, node, in_shape, norm):
    return (N.max_pool_l2(op), "window overlap") if norm == "2" else (1.0, "")


def _global_avg(op, node, in_shape, norm):
    hw = int(np.prod(in_shape[2:]))
    return (sqrt_up(1.0 / hw), "1/sqrt(HW)") if norm == "2" else (1.0, "")


def _activation(op, node, in_shape, norm):
    lo, hi = O.slope_range(op)
    return max(abs(lo), abs(hi)), "max slope"


def _softmax(op, node, in_shape, norm):
    # J = diag(p) - p p^T: Gershgorin rows 2 p_i (1 - p_i) <= 1/2 bound both norms.
    return 0.5, "softmax Jacobian"


def _scale(op: O.Scale, node, in_shape, norm):
    return N.scale_norm(op), "max |scale|"


UNARY = {
    O.Dense: _dense,
    O.Conv: _conv,
    O.ConvTranspose: _conv_transpose,
    O.Scale: _scale,
    O.Reshape: _one,
    O.Transpose: _one,
    O.Slice: _one,
    O.Pad: _one,
    O.AvgPool: _pool,
    O.GlobalAvgPool: _global_avg,
    O.MaxPool: _max_pool,
    O.Relu: _activation,
    O.LeakyRelu: _activation,
    O.Sigmoid: _activation,
    O.Tanh: _activation,
    O.Clip: _activation,
    O.Elu: _activation,
    O.Softplus: _activation,
    O.Gelu: _activation,
    O.Silu: _activation,
    O.Softmax: _softmax,
    O.GroupSort: _one,
    O.Reduce: _one,  # max/min over disjoint groups: |max_S x - max_S y| <= ||(x - y)_S||
}


def _add(op: O.Add, inputs: list[float], norm: str) -> float:
    return add_up(*(mul_up(abs(c), li) for c, li in zip(op.coeffs, inputs, strict=True)))


def _quadrature(op, inputs: list[float], norm: str) -> float:
    if norm == "inf":
        return max(inputs)
    return sqrt_up(add_up(*(mul_up(li, li) for li in inputs)))


MULTI = {O.Add: _add, O.Concat: _quadrature, O.Extremum: _quadrature}


def propagate(graph: Graph, norm: str, factor_fn,
              combine_fn=None) -> tuple[float, list[dict[str, Any]]]:
    """Run the DAG rule with ``factor_fn(node, in_shape) -> (factor, how)`` for unary nodes;
    ``combine_fn(node, lip)`` may return a tighter value for a multi-input node."""
    lip = {graph.input: 1.0}
    layers: list[dict[str, Any]] = []
    for node in graph.nodes:
        ins = [lip[i] for i in node.inputs]
        if type(node.op) in MULTI:
            special = combine_fn(node, lip) if combine_fn is not None else None
            lip[node.output] = checked(
                special if special is not None else MULTI[type(node.op)](node.op, ins, norm),
                f"the {node.op.kind} bound at node {node.source!r}")
            layers.append({"node": node.source, "op": node.op.kind, "combine": ins,
                           "value": lip[node.output]})
            continue
        factor, how = factor_fn(node, graph.shape_of(node.inputs[0]))
        factor = checked(poison("naive.factor", factor),
                         f"the {node.op.kind} factor of node {node.source!r}")
        lip[node.output] = mul_up(factor, ins[0])
        if factor != 1.0 or how:
            layers.append({"node": node.source, "op": node.op.kind, "factor": factor,
                           "how": how})
    return lip[graph.output], layers


@register
class NaiveEstimator(Estimator):
    name = "naive"
    summary = "product of per-layer norms along the DAG (sums at residual Adds)"
    handlers = {**UNARY, **MULTI}

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:
        def factor(node: Node, in_shape):
            return cached_factor(node.op, (self.name, norm, in_shape),
                                 lambda: UNARY[type(node.op)](node.op, node, in_shape, norm))

        value, layers = propagate(graph, norm, factor)
        notes = []
        if not math.isfinite(value):
            notes.append("the bound overflowed float64")
            value = math.inf
        return Bound(method=self.name, norm=norm, upper=value,
                     notes=notes, details={"layers": layers})
