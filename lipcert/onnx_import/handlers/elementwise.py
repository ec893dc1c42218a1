"""Elementwise arithmetic: Add, Sub, Mul, Div, Neg with constants or between data tensors."""

from __future__ import annotations

import numpy as np

from ...ir import ops as O
from ..context import ImportContext, Unsupported
from ..registry import handles
from .common import check_broadcast


def _data_and_const(ctx: ImportContext) -> tuple[str, np.ndarray, int]:
    """(data value, constant reshaped to its rank, index of the data input)."""
    i = 0 if ctx.is_data(0) else 1
    x = ctx.data_input(i)
    c = check_broadcast(ctx.shape(x), ctx.const(1 - i).astype(np.float64))
    return x, c, i


def _two_data(ctx: ImportContext, coeffs: tuple[float, float]) -> None:
    a, b = ctx.data_input(0), ctx.data_input(1)
    if ctx.shape(a) != ctx.shape(b):
        raise Unsupported(f"broadcasting between data tensors {ctx.shape(a)} and {ctx.shape(b)}")
    ctx.bind(0, ctx.emit(O.Add(coeffs), [a, b]))


@handles("Add", "Sub")
def add_sub(ctx: ImportContext) -> None:
    sign = -1.0 if ctx.node.op_type == "Sub" else 1.0
    if ctx.is_data(0) and ctx.is_data(1):
        _two_data(ctx, (1.0, sign))
        return
    x, c, i = _data_and_const(ctx)
    ones = np.ones_like(c)
    # x + c, x - c   |   c + x, c - x
    op = O.Scale(ones, sign * c) if i == 0 else O.Scale(sign * ones, c)
    ctx.bind(0, ctx.emit(op, [x]))


def _sigmoid_of(ctx: ImportContext, value: str) -> str | None:
    """The input of the Sigmoid node whose output is ``value``, if one made it."""
    for node in reversed(ctx.nodes):
        if node.output == value:
            return node.inputs[0] if isinstance(node.op, O.Sigmoid) else None
    return None


@handles("Mul")
def mul(ctx: ImportContext) -> None:
    if ctx.is_data(0) and ctx.is_data(1):
        a, b = ctx.data_input(0), ctx.data_input(1)
        for x, s in ((a, b), (b, a)):  # x * sigmoid(x): SiLU (torch's export of nn.SiLU)
            if _sigmoid_of(ctx, s) == x:
                ctx.bind(0, ctx.emit(O.Silu(), [x]))
                return
        raise Unsupported("product of two tensors that both depend on the input (x * "
                          "Sigmoid(x), SiLU, is the one such product supported)")
    x, c, _ = _data_and_const(ctx)
    ctx.bind(0, ctx.emit(O.Scale(c, np.zeros_like(c)), [x]))


@handles("Div")
def div(ctx: ImportContext) -> None:
    if not ctx.is_data(0) or ctx.is_data(1):
        raise Unsupported("division by a tensor that depends on the input")
    x, c, _ = _data_and_const(ctx)
    if np.any(c == 0):
        raise Unsupported("division by zero")
    # ORT divides in float32: x / c differs from x * (1/c) by rounding only.
    ctx.bind(0, ctx.emit(O.Scale(1.0 / c, np.zeros_like(c)), [x]))


@handles("Neg")
def neg(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    ctx.bind(0, ctx.emit(O.Scale(-np.ones((1,) * len(ctx.shape(x))),
                                 np.zeros((1,) * len(ctx.shape(x)))), [x]))
