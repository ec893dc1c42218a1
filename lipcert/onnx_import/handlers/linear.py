"""Affine ONNX ops: Gemm, MatMul, BatchNormalization (inference)."""

from __future__ import annotations

import numpy as np

from ...ir import ops as O
from ..context import ImportContext, Unsupported
from ..registry import handles
from .common import check_broadcast


@handles("Gemm")
def gemm(ctx: ImportContext) -> None:
    """Y = alpha * A' B' + beta * C with A the data (ONNX Gemm)."""
    if not ctx.is_data(0) or ctx.is_data(1):
        raise Unsupported("only Gemm(data, constant weight) is supported")
    x = ctx.data_input(0)
    if ctx.attr("transA", 0):
        x = ctx.emit(O.Transpose((1, 0)), [x])
    b = ctx.const(1).astype(np.float64)
    if b.ndim != 2:
        raise Unsupported(f"weight of rank {b.ndim}")
    if not ctx.attr("transB", 0):
        b = b.T
    weight = float(ctx.attr("alpha", 1.0)) * b  # (N_out, K)
    c = ctx.const(2, required=False)
    out_shape = (ctx.shape(x)[0], weight.shape[0])
    bias = None
    shift = None
    if c is not None:
        c = float(ctx.attr("beta", 1.0)) * np.asarray(c, dtype=np.float64)
        c = np.broadcast_to(c, out_shape) if c.size != 1 else np.full(out_shape, c.item())
        if np.all(c == c[:1]):
            bias = np.array(c[0])
        else:
            shift = np.array(c)
    y = ctx.emit(O.Dense(weight, bias, 1), [x])
    if shift is not None:
        y = ctx.emit(O.Scale(np.ones((1, 1)), shift), [y])
    ctx.bind(0, y)


@handles("MatMul")
def matmul(ctx: ImportContext) -> None:
    """MatMul with a constant matrix on either side (numpy matmul semantics)."""
    if ctx.is_data(0) and not ctx.is_data(1):
        x = ctx.data_input(0)
        w = ctx.const(1).astype(np.float64)
        if w.ndim > 2:
            if any(d != 1 for d in w.shape[:-2]):
                raise Unsupported("batched MatMul with a constant of rank > 2")
            w = w.reshape(w.shape[-2:])
        rank = len(ctx.shape(x))
        if w.ndim == 1:
            y = ctx.emit(O.Dense(w[None, :], None, rank - 1), [x])
            y = ctx.emit(O.Reshape(ctx.shape(y)[:-1]), [y])
        else:
            y = ctx.emit(O.Dense(w.T.copy(), None, rank - 1), [x])
    elif ctx.is_data(1) and not ctx.is_data(0):
        x = ctx.data_input(1)
        w = ctx.const(0).astype(np.float64)
        if w.ndim != 2:
            raise Unsupported(f"MatMul(constant of rank {w.ndim}, data)")
        rank = len(ctx.shape(x))
        y = ctx.emit(O.Dense(w, None, 0 if rank == 1 else rank - 2), [x])
    else:
        raise Unsupported("MatMul of two tensors that both depend on the input (bilinear)")
    ctx.bind(0, y)


@handles("BatchNormalization")
def batch_norm(ctx: ImportContext) -> None:
    """Inference BatchNorm: y = gamma (x - mean) / sqrt(var + eps) + beta, a diagonal affine."""
    if ctx.attr("training_mode", 0) or any(ctx.output_used(i) for i in (1, 2, 3, 4)):
        raise Unsupported("training-mode BatchNormalization")
    x = ctx.data_input(0)
    gamma, beta, mean, var = (ctx.const(i).astype(np.float64) for i in (1, 2, 3, 4))
    eps = float(ctx.attr("epsilon", 1e-5))
    # ORT computes sqrt(var + eps) in float32; float64 here differs by rounding only.
    scale = gamma / np.sqrt(var + np.float64(np.float32(eps)))
    shift = beta - mean * scale
    rank = len(ctx.shape(x))
    shape = (1, -1) + (1,) * (rank - 2)
    scale_b = check_broadcast(ctx.shape(x), scale.reshape(shape))
    ctx.bind(0, ctx.emit(O.Scale(scale_b, shift.reshape(shape)), [x]))
