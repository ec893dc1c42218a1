"""Pooling and padding: MaxPool, AveragePool, GlobalAveragePool, Pad (constant mode)."""

from __future__ import annotations

import numpy as np

from ...ir import ops as O
from ..context import ImportContext, Unsupported
from ..registry import handles
from .common import pair, reduce_axes, spatial_pads


def _window(ctx: ImportContext, x: str):
    if len(ctx.shape(x)) != 4:
        raise Unsupported(f"input of rank {len(ctx.shape(x))} (2-D pooling only)")
    kernel = pair(ctx.attr("kernel_shape"), 1)
    stride = pair(ctx.attr("strides"), 1)
    dilation = pair(ctx.attr("dilations"), 1)
    pads = spatial_pads(ctx, ctx.shape(x)[2:], kernel, stride, dilation)
    return kernel, stride, dilation, pads, bool(ctx.attr("ceil_mode", 0))


@handles("MaxPool")
def max_pool(ctx: ImportContext) -> None:
    if ctx.output_used(1):
        raise Unsupported("the Indices output of MaxPool")
    x = ctx.data_input(0)
    kernel, stride, dilation, pads, ceil_mode = _window(ctx, x)
    ctx.bind(0, ctx.emit(O.MaxPool(kernel, stride, pads, dilation, ceil_mode), [x]))


@handles("AveragePool")
def average_pool(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    kernel, stride, dilation, pads, ceil_mode = _window(ctx, x)
    if dilation != (1, 1):
        raise Unsupported("dilated AveragePool")
    include = bool(ctx.attr("count_include_pad", 0))
    ctx.bind(0, ctx.emit(O.AvgPool(kernel, stride, pads, ceil_mode, include), [x]))


@handles("GlobalAveragePool")
def global_average_pool(ctx: ImportContext) -> None:
    ctx.bind(0, ctx.emit(O.GlobalAvgPool(), [ctx.data_input(0)]))


@handles("Pad")
def pad(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    rank = len(ctx.shape(x))
    mode = ctx.attr("mode", "constant")
    if mode != "constant":
        raise Unsupported(f"Pad mode {mode!r} (only 'constant')")
    if ctx.opset < 11:
        pads = [int(p) for p in ctx.attr("pads")]
        value = float(ctx.attr("value", 0.0))
    else:
        pads = ctx.const_ints(1) or []
        v = ctx.const(2, required=False)
        value = 0.0 if v is None or v.size == 0 else float(np.asarray(v).reshape(-1)[0])
    axes = ctx.const_ints(3) if ctx.n_inputs() > 3 else None
    axes = list(range(rank)) if axes is None else [a % rank for a in axes]
    if len(pads) != 2 * len(axes):
        raise Unsupported(f"pads {pads} do not match {len(axes)} axes")
    per_axis = [(0, 0)] * rank
    for k, a in enumerate(axes):
        per_axis[a] = (pads[k], pads[k + len(axes)])
    if all(p == (0, 0) for p in per_axis):
        ctx.bind(0, x)
        return
    ctx.bind(0, ctx.emit(O.Pad(tuple(per_axis), value), [x]))


@handles("ReduceMean")
def reduce_mean(ctx: ImportContext) -> None:
    """ReduceMean over all spatial axes (what exporters emit for global average pooling)."""
    x = ctx.data_input(0)
    dims = ctx.shape(x)
    axes = reduce_axes(ctx, len(dims))
    if len(dims) < 3 or axes != list(range(2, len(dims))):
        raise Unsupported(f"ReduceMean over axes {axes} (only over all spatial axes)")
    y = ctx.emit(O.GlobalAvgPool(), [x])
    if not ctx.attr("keepdims", 1):
        y = ctx.emit(O.Reshape(dims[:2]), [y])
    ctx.bind(0, y)
