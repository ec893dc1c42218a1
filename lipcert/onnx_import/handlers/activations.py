"""Activations: Relu, LeakyRelu, PRelu (one slope), Sigmoid, Tanh, Elu, Softplus, Gelu,
Clip, Softmax, Max/Min, TopK (sorting), ReduceMax/ReduceMin. (SiLU, Mul(x, Sigmoid(x)), is
recognised by the Mul handler.)"""

from __future__ import annotations

import numpy as np

from ...ir import ops as O
from ..context import ImportContext, Unsupported
from ..registry import handles
from .common import norm_axis, reduce_axes


@handles("Relu")
def relu(ctx: ImportContext) -> None:
    ctx.bind(0, ctx.emit(O.Relu(), [ctx.data_input(0)]))


@handles("LeakyRelu")
def leaky_relu(ctx: ImportContext) -> None:
    alpha = float(np.float32(ctx.attr("alpha", 0.01)))
    ctx.bind(0, ctx.emit(O.LeakyRelu(alpha), [ctx.data_input(0)]))


@handles("PRelu")
def prelu(ctx: ImportContext) -> None:
    """PRelu with one slope (torch's nn.PReLU() default) is LeakyRelu with that slope; a
    slope per channel is refused (every method reads one slope per activation)."""
    x = ctx.data_input(0)
    if ctx.is_data(1):
        raise Unsupported("a slope computed from the model input")
    slope = np.asarray(ctx.const(1))
    if slope.size != 1:
        raise Unsupported(f"PRelu with {slope.size} slopes (shape {list(slope.shape)}); one "
                          "slope (nn.PReLU() with num_parameters=1) imports as LeakyRelu")
    if len(slope.shape) > len(ctx.shape(x)):  # broadcasting would change the output's rank
        raise Unsupported(f"a slope of rank {len(slope.shape)} on an input of rank "
                          f"{len(ctx.shape(x))}")
    alpha = float(slope.reshape(-1)[0])  # the tensor's own precision (a double model's too)
    ctx.bind(0, ctx.emit(O.LeakyRelu(alpha), [x]))


@handles("Sigmoid")
def sigmoid(ctx: ImportContext) -> None:
    ctx.bind(0, ctx.emit(O.Sigmoid(), [ctx.data_input(0)]))


@handles("Tanh")
def tanh(ctx: ImportContext) -> None:
    ctx.bind(0, ctx.emit(O.Tanh(), [ctx.data_input(0)]))


@handles("Elu")
def elu(ctx: ImportContext) -> None:
    alpha = float(np.float32(ctx.attr("alpha", 1.0)))
    if not alpha >= 0.0:
        raise Unsupported(f"Elu with alpha = {alpha} (not increasing); alpha >= 0 is supported")
    ctx.bind(0, ctx.emit(O.Elu(alpha), [ctx.data_input(0)]))


@handles("Softplus")
def softplus(ctx: ImportContext) -> None:
    ctx.bind(0, ctx.emit(O.Softplus(), [ctx.data_input(0)]))


@handles("Gelu")
def gelu(ctx: ImportContext) -> None:
    approximate = ctx.attr("approximate", "none")
    if approximate != "none":
        raise Unsupported(f"Gelu with approximate={approximate!r} (another function); the exact "
                          "form (approximate='none', torch's default) is supported")
    ctx.bind(0, ctx.emit(O.Gelu(), [ctx.data_input(0)]))


def _scalar(value: np.ndarray | None, default: float) -> float:
    if value is None or value.size == 0:
        return default
    if value.size != 1:
        raise Unsupported("a non-scalar bound")
    return float(value.reshape(-1)[0])


@handles("Clip")
def clip(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    if ctx.opset < 11:
        low = float(ctx.attr("min", -np.inf))
        high = float(ctx.attr("max", np.inf))
    else:
        low = _scalar(ctx.const(1, required=False), -np.inf) if ctx.input_name(1) else -np.inf
        high = _scalar(ctx.const(2, required=False), np.inf) if ctx.input_name(2) else np.inf
    if ctx.input_name(1) and ctx.is_data(1) or ctx.input_name(2) and ctx.is_data(2):
        raise Unsupported("clip bounds that depend on the input")
    ctx.bind(0, ctx.emit(O.Clip(low, high), [x]))


@handles("Softmax")
def softmax(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    rank = len(ctx.shape(x))
    if ctx.opset < 13:
        axis = norm_axis(int(ctx.attr("axis", 1)), rank)
        ctx.bind(0, ctx.emit(O.Softmax(axis, flatten=True), [x]))
    else:
        axis = norm_axis(int(ctx.attr("axis", -1)), rank)
        ctx.bind(0, ctx.emit(O.Softmax(axis), [x]))


@handles("Max", "Min")
def extremum(ctx: ImportContext) -> None:
    """Elementwise Max/Min. With one scalar constant it is a Clip; between data tensors it is
    kept as Extremum for the MaxMin pattern pass."""
    mode = ctx.node.op_type.lower()
    data = [i for i in range(ctx.n_inputs()) if ctx.is_data(i)]
    consts = [i for i in range(ctx.n_inputs()) if not ctx.is_data(i) and ctx.input_name(i)]
    if len(data) == 1 and len(consts) == 1 and ctx.const(consts[0]).size == 1:
        c = float(ctx.const(consts[0]).reshape(-1)[0])
        op = O.Clip(c, np.inf) if mode == "max" else O.Clip(-np.inf, c)
        ctx.bind(0, ctx.emit(op, [ctx.data_input(data[0])]))
        return
    if consts:
        raise Unsupported(f"{ctx.node.op_type} of data with a non-scalar constant")
    values = [ctx.data_input(i) for i in data]
    if len({ctx.shape(v) for v in values}) != 1:
        raise Unsupported("broadcasting between data tensors")
    if len(values) == 1:
        ctx.bind(0, values[0])
        return
    ctx.bind(0, ctx.emit(O.Extremum(mode), values))


@handles("TopK")
def top_k(ctx: ImportContext) -> None:
    """TopK values over a whole axis is a sort (GroupSort with one group); k < n adds a Slice.
    The indices output is not a Lipschitz function and is refused if used."""
    if ctx.output_used(1):
        raise Unsupported("the Indices output of TopK")
    x = ctx.data_input(0)
    rank = len(ctx.shape(x))
    axis = norm_axis(int(ctx.attr("axis", -1)), rank)
    n = ctx.shape(x)[axis]
    k = int(ctx.const(1).reshape(-1)[0]) if ctx.opset >= 10 else int(ctx.attr("k"))
    if not ctx.attr("sorted", 1):
        raise Unsupported("TopK with sorted=0 (order unspecified)")
    positions = np.arange(n) if ctx.attr("largest", 1) else np.arange(n)[::-1].copy()
    y = ctx.emit(O.GroupSort(axis, positions[None, :]), [x])
    if k < n:
        y = ctx.emit(O.Slice(axis, 0, k, 1), [y])
    ctx.bind(0, y)


@handles("ReduceMax", "ReduceMin")
def reduce_extremum(ctx: ImportContext) -> None:
    """Max/min over axes (attribute before opset 18, input after; no axes: all of them,
    unless noop_with_empty_axes). Exporters write GroupSort2 and MaxMin this way; the
    order-statistics pass turns those forms into GroupSort."""
    x = ctx.data_input(0)
    rank = len(ctx.shape(x))
    axes = reduce_axes(ctx, rank)
    if axes is None:
        if ctx.attr("noop_with_empty_axes", 0):
            ctx.bind(0, x)
            return
        axes = list(range(rank))
    axes = tuple(axes)
    mode = "max" if ctx.node.op_type == "ReduceMax" else "min"
    ctx.bind(0, ctx.emit(O.Reduce(mode, axes, bool(ctx.attr("keepdims", 1))), [x]))


@handles("HardSigmoid")
def hard_sigmoid(ctx: ImportContext) -> None:
    """HardSigmoid(x) = max(0, min(1, alpha x + beta)): an elementwise affine map (Scale)
    followed by Clip(0, 1); every method then reads it through ops it already knows."""
    x = ctx.data_input(0)
    alpha = float(np.float32(ctx.attr("alpha", 0.2)))
    beta = float(np.float32(ctx.attr("beta", 0.5)))
    ones = (1,) * len(ctx.shape(x))
    y = ctx.emit(O.Scale(np.full(ones, alpha), np.full(ones, beta)), [x])
    ctx.bind(0, ctx.emit(O.Clip(0.0, 1.0), [y]))
