"""Layout ops: Identity, Dropout, Cast, Shape, Flatten, Reshape, Squeeze, Unsqueeze,
Transpose, Concat, Split, Slice, Gather."""

from __future__ import annotations

import numpy as np
import onnx

from ...ir import ops as O
from ..context import ImportContext, Unsupported
from ..registry import handles
from .common import norm_axis


@handles("Identity")
def identity(ctx: ImportContext) -> None:
    ctx.bind(0, ctx.data_input(0))


@handles("Dropout")
def dropout(ctx: ImportContext) -> None:
    """Inference Dropout is the identity; training mode or a used mask is refused."""
    if ctx.output_used(1):
        raise Unsupported("the mask output of Dropout")
    training = ctx.const(2, required=False) if ctx.n_inputs() > 2 else None
    if training is not None and bool(np.asarray(training).reshape(-1)[0]):
        raise Unsupported("Dropout in training mode")
    ctx.bind(0, ctx.data_input(0))


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}


_FLOAT_DTYPES = (np.float32, np.float64)


@handles("Cast", "CastLike")
def cast(ctx: ImportContext) -> None:
    """A float32/float64 cast of data is the identity up to rounding (checked by the fidelity
    test). Casts to integer, bool or 16-bit types round to a staircase whose Lipschitz constant
    is unbounded: refused, for Cast (``to``) and CastLike (the dtype of its second input)."""
    if ctx.node.op_type == "Cast":
        to = ctx.attr("to")
        if to is None:
            raise Unsupported("Cast without a 'to' attribute")
        if int(to) not in _FLOAT_TYPES:
            name = _type_name(int(to))
            raise Unsupported(f"Cast to {name} (only float32/float64 casts of data)")
    else:
        if ctx.input_name(1) is None:
            raise Unsupported("CastLike without a target_type input")
        if not ctx.is_data(1):
            target = ctx.const(1)
            if target.dtype.type not in _FLOAT_DTYPES:
                raise Unsupported(f"CastLike to {target.dtype} (only float32/float64 casts "
                                  "of data)")
        # a data target is computed from the (float) model input by supported ops: float
    ctx.bind(0, ctx.data_input(0))


def _type_name(to: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(to)
    except ValueError:
        return f"element type {to}"


@handles("Shape")
def shape(ctx: ImportContext) -> None:
    dims = ctx.shape(ctx.data_input(0))
    start, end = ctx.attr("start", 0), ctx.attr("end", None)
    ctx.set_const(0, np.array(dims[start:end], dtype=np.int64))


@handles("Size")
def size(ctx: ImportContext) -> None:
    ctx.set_const(0, np.array(int(np.prod(ctx.shape(ctx.data_input(0)))), dtype=np.int64))


def _reshape_to(ctx: ImportContext, x: str, new_shape) -> None:
    new_shape = tuple(int(d) for d in new_shape)
    if new_shape == ctx.shape(x):
        ctx.bind(0, x)
    else:
        ctx.bind(0, ctx.emit(O.Reshape(new_shape), [x]))


@handles("Flatten")
def flatten(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    dims = ctx.shape(x)
    axis = int(ctx.attr("axis", 1))
    axis = axis % len(dims) if axis < 0 else axis
    lead = int(np.prod(dims[:axis], dtype=np.int64))
    _reshape_to(ctx, x, (lead, int(np.prod(dims[axis:], dtype=np.int64))))


@handles("Reshape")
def reshape(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    dims = ctx.shape(x)
    target = ctx.const_ints(1) if ctx.opset >= 5 else list(ctx.attr("shape"))
    if target is None:
        raise Unsupported("a target shape computed from the input")
    allow_zero = bool(ctx.attr("allowzero", 0))
    resolved = [dims[i] if d == 0 and not allow_zero else d for i, d in enumerate(target)]
    try:
        new_shape = np.empty(dims, dtype=np.uint8).reshape(resolved).shape
    except ValueError as exc:
        raise Unsupported(f"cannot reshape {dims} to {target}: {exc}") from None
    _reshape_to(ctx, x, new_shape)


@handles("Squeeze", "Unsqueeze")
def squeeze(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    dims = list(ctx.shape(x))
    axes = ctx.attr("axes") if ctx.opset < 13 else ctx.const_ints(1)
    if ctx.node.op_type == "Squeeze":
        axes = [i for i, d in enumerate(dims) if d == 1] if axes is None else \
            [norm_axis(a, len(dims)) for a in axes]
        new = [d for i, d in enumerate(dims) if i not in axes]
    else:
        if axes is None:
            raise Unsupported("Unsqueeze without axes")
        rank = len(dims) + len(axes)
        axes = sorted(norm_axis(a, rank) for a in axes)
        new = dims[:]
        for a in axes:
            new.insert(a, 1)
    _reshape_to(ctx, x, new)


@handles("Transpose")
def transpose(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    rank = len(ctx.shape(x))
    perm = tuple(int(p) for p in ctx.attr("perm", list(reversed(range(rank)))))
    if perm == tuple(range(rank)):
        ctx.bind(0, x)
    else:
        ctx.bind(0, ctx.emit(O.Transpose(perm), [x]))


@handles("Concat")
def concat(ctx: ImportContext) -> None:
    names = [ctx.input_name(i) for i in range(ctx.n_inputs())]
    if not all(ctx.is_data(i) for i in range(len(names))):
        raise Unsupported("Concat of data with constants")
    values = [ctx.data_input(i) for i in range(len(names))]
    axis = norm_axis(int(ctx.attr("axis")), len(ctx.shape(values[0])))
    if len(values) == 1:
        ctx.bind(0, values[0])
        return
    ctx.bind(0, ctx.emit(O.Concat(axis), values))


def _emit_slice(ctx: ImportContext, x: str, axis: int, start: int, stop: int, step: int) -> str:
    n = ctx.shape(x)[axis]
    if (start, stop, step) == (0, n, 1):
        return x
    return ctx.emit(O.Slice(axis, start, stop, step), [x])


@handles("Split")
def split(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    rank = len(ctx.shape(x))
    axis = norm_axis(int(ctx.attr("axis", 0)), rank)
    n = ctx.shape(x)[axis]
    outputs = len(ctx.node.output)
    sizes = ctx.attr("split") if ctx.opset < 13 else ctx.const_ints(1)
    if sizes is None:
        parts = int(ctx.attr("num_outputs", outputs))
        chunk = -(-n // parts)
        sizes = [min(chunk, n - k * chunk) for k in range(parts)]
    start = 0
    for i, size_i in enumerate(sizes):
        ctx.bind(i, _emit_slice(ctx, x, axis, start, start + int(size_i), 1))
        start += int(size_i)


@handles("Slice")
def slice_(ctx: ImportContext) -> None:
    x = ctx.data_input(0)
    rank = len(ctx.shape(x))
    if ctx.opset < 10:
        starts, ends = list(ctx.attr("starts")), list(ctx.attr("ends"))
        axes, steps = ctx.attr("axes"), None
    else:
        starts, ends = ctx.const_ints(1), ctx.const_ints(2)
        axes = ctx.const_ints(3) if ctx.n_inputs() > 3 else None
        steps = ctx.const_ints(4) if ctx.n_inputs() > 4 else None
        if starts is None or ends is None:
            raise Unsupported("slice bounds computed from the input")
    axes = list(range(len(starts))) if axes is None else list(axes)
    steps = [1] * len(starts) if steps is None else steps
    y = x
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a = norm_axis(int(a), rank)
        n = ctx.shape(y)[a]
        s, e = max(min(int(s), 2**62), -(2**62)), max(min(int(e), 2**62), -(2**62))
        start, stop, step = slice(s, e, int(st)).indices(n)
        if len(range(start, stop, step)) == 0:
            raise Unsupported("an empty slice")
        y = _emit_slice(ctx, y, a, start, stop, step)
    ctx.bind(0, y)


@handles("Gather")
def gather(ctx: ImportContext) -> None:
    """Gather of data with constant indices forming an arithmetic progression (a slice)."""
    x = ctx.data_input(0)
    dims = ctx.shape(x)
    axis = norm_axis(int(ctx.attr("axis", 0)), len(dims))
    idx = np.asarray(ctx.const(1)).astype(np.int64)
    flat = np.where(idx.reshape(-1) < 0, idx.reshape(-1) + dims[axis], idx.reshape(-1))
    step = int(flat[1] - flat[0]) if flat.size > 1 else 1
    if flat.size == 0 or step == 0 or np.any(np.diff(flat) != step):
        raise Unsupported("Gather with indices that are not an evenly spaced range")
    # the IR Slice indexes like torch.arange(start, stop, step): stop = -1 reaches index 0
    y = _emit_slice(ctx, x, axis, int(flat[0]), int(flat[-1]) + step, step)
    _reshape_to(ctx, y, dims[:axis] + idx.shape + dims[axis + 1:])
