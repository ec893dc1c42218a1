"""Conv and ConvTranspose (2-D; 1-D runs as 2-D with a unit height)."""

from __future__ import annotations

import numpy as np

from ...ir import ops as O
from ..context import ImportContext, Unsupported
from ..registry import handles
from .common import pair, spatial_pads


def _as_2d(ctx: ImportContext, x: str, w: np.ndarray) -> tuple[str, np.ndarray, bool]:
    """Lift a 1-D conv (N, C, L) to 2-D (N, C, 1, L)."""
    rank = len(ctx.shape(x))
    if rank == 4 and w.ndim == 4:
        return x, w, False
    if rank == 3 and w.ndim == 3:
        n, c, length = ctx.shape(x)
        return ctx.emit(O.Reshape((n, c, 1, length)), [x]), w[:, :, None, :], True
    raise Unsupported(f"input of rank {rank} (1-D and 2-D convolutions only)")


def _attr_2d(ctx: ImportContext, name: str, default: int, lifted: bool) -> tuple[int, int]:
    value = ctx.attr(name)
    if lifted and value is not None:
        value = [default, *value]
    return pair(value, default)


def _pads_2d(ctx, hw, kernel, stride, dilation, lifted):
    if lifted and ctx.attr("pads") is not None:
        p = ctx.attr("pads")
        return (0, int(p[0]), 0, int(p[1]))
    return spatial_pads(ctx, hw, kernel, stride, dilation)


def _drop_lift(ctx: ImportContext, y: str, lifted: bool) -> str:
    if not lifted:
        return y
    n, c, _, length = ctx.shape(y)
    return ctx.emit(O.Reshape((n, c, length)), [y])


def _read_conv(ctx: ImportContext):
    """Inputs and attributes shared by Conv and ConvTranspose."""
    x = ctx.data_input(0)
    w = ctx.const(1).astype(np.float64)
    x, w, lifted = _as_2d(ctx, x, w)
    b = ctx.const(2, required=False)
    bias = None if b is None else b.astype(np.float64)
    stride = _attr_2d(ctx, "strides", 1, lifted)
    dilation = _attr_2d(ctx, "dilations", 1, lifted)
    return x, w, bias, lifted, stride, dilation, tuple(w.shape[2:]), int(ctx.attr("group", 1))


@handles("Conv")
def conv(ctx: ImportContext) -> None:
    x, w, bias, lifted, stride, dilation, kernel, groups = _read_conv(ctx)
    pads = _pads_2d(ctx, ctx.shape(x)[2:], kernel, stride, dilation, lifted)
    op = O.Conv(w, bias, stride, pads, dilation, groups)
    ctx.bind(0, _drop_lift(ctx, ctx.emit(op, [x]), lifted))


@handles("ConvTranspose")
def conv_transpose(ctx: ImportContext) -> None:
    x, w, bias, lifted, stride, dilation, kernel, groups = _read_conv(ctx)
    out_pad = _attr_2d(ctx, "output_padding", 0, lifted)
    hw = ctx.shape(x)[2:]
    output_shape = ctx.attr("output_shape")
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is not None:
            target = list(output_shape)[-2:] if not lifted else [1, list(output_shape)[-1]]
        else:
            target = [n * s for n, s in zip(hw, stride, strict=True)]
        begin, end = [], []
        for n, k, s, d, op_, t in zip(hw, kernel, stride, dilation, out_pad, target,
                                      strict=True):
            total = s * (n - 1) + op_ + (k - 1) * d + 1 - int(t)
            if total < 0:
                raise Unsupported(f"output_shape {list(output_shape)} larger than the full output")
            if auto_pad == "SAME_UPPER":
                begin.append(total // 2)
                end.append(total - total // 2)
            else:
                begin.append(total - total // 2)
                end.append(total // 2)
        pads = (begin[0], begin[1], end[0], end[1])
    elif auto_pad == "VALID" or ctx.attr("pads") is None:
        pads = (0, 0, 0, 0)
    else:
        pads = _pads_2d(ctx, hw, kernel, stride, dilation, lifted)
    op = O.ConvTranspose(w, bias, stride, pads, out_pad, dilation, groups)
    ctx.bind(0, _drop_lift(ctx, ctx.emit(op, [x]), lifted))
