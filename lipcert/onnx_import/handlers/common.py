"""Helpers shared by the op handlers."""

from __future__ import annotations

import numpy as np

from ..context import Unsupported


def to_rank(array: np.ndarray, rank: int) -> np.ndarray:
    """Prepend unit axes so ``array`` broadcasts against a tensor of ``rank`` axes."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim > rank:
        squeezed = array.reshape(array.shape[array.ndim - rank:]) \
            if all(d == 1 for d in array.shape[: array.ndim - rank]) else None
        if squeezed is None:
            raise Unsupported(f"a constant of shape {array.shape} broadcasts the data to a "
                              "larger shape")
        return squeezed
    return array.reshape((1,) * (rank - array.ndim) + array.shape)


def check_broadcast(data_shape: tuple[int, ...], const: np.ndarray) -> np.ndarray:
    """The constant reshaped to the data's rank; refuse constants that enlarge the data."""
    c = to_rank(const, len(data_shape))
    out = np.broadcast_shapes(data_shape, c.shape)
    if tuple(out) != tuple(data_shape):
        raise Unsupported(f"a constant of shape {const.shape} broadcasts the data of shape "
                          f"{data_shape} to {tuple(out)}")
    return c


def norm_axis(axis: int, rank: int) -> int:
    if not -rank <= axis < rank:
        raise Unsupported(f"axis {axis} out of range for rank {rank}")
    return axis % rank


def pair(values, default: int, n: int = 2) -> tuple[int, ...]:
    if values is None:
        return (default,) * n
    values = tuple(int(v) for v in values)
    if len(values) != n:
        raise Unsupported(f"expected {n} values, got {list(values)} (only 2-D spatial ops)")
    return values


def spatial_pads(ctx, in_hw: tuple[int, int], kernel: tuple[int, int],
                 stride: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """ONNX pads/auto_pad for a 2-D window op as (top, left, bottom, right)."""
    auto_pad = ctx.attr("auto_pad", "NOTSET")
    if auto_pad in ("NOTSET", ""):
        pads = ctx.attr("pads")
        if pads is None:
            return (0, 0, 0, 0)
        if len(pads) != 4:
            raise Unsupported(f"pads {list(pads)} (only 2-D spatial ops)")
        return (int(pads[0]), int(pads[1]), int(pads[2]), int(pads[3]))
    if auto_pad == "VALID":
        return (0, 0, 0, 0)
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad={auto_pad}")
    begin, end = [], []
    for n, k, s, d in zip(in_hw, kernel, stride, dilation, strict=True):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        b, e = (small, large) if auto_pad == "SAME_UPPER" else (large, small)
        begin.append(b)
        end.append(e)
    return (begin[0], begin[1], end[0], end[1])


def reduce_axes(ctx, rank: int) -> list[int] | None:
    """The axes of a Reduce* node, normalised and sorted: the attribute before opset 18, the
    constant second input from 18 on; None when none are given (reduce over all, or nothing
    with noop_with_empty_axes). Axes computed from the model input are refused."""
    if ctx.opset < 18:
        axes = ctx.attr("axes")
    elif ctx.n_inputs() > 1 and ctx.input_name(1):
        axes = ctx.const_ints(1)
        if axes is None:
            raise Unsupported("axes computed from the model input (they must be constant)")
    else:
        axes = None
    if axes is None or len(axes) == 0:
        return None
    return sorted({norm_axis(int(a), rank) for a in axes})
