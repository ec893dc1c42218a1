"""Torch forward of the IR, in float64 by default: used for import fidelity checks, shape
inference while importing, lower bounds and certification margins.

One function per op kind in ``FORWARD``; each takes a single tensor of the model's own shape
(batch via ``torch.func.vmap`` in :func:`run_batch`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import ops as O
from .graph import Graph

_TENSORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def param(op: O.Op, name: str, like: torch.Tensor) -> torch.Tensor:
    """The op's array ``name`` as a tensor of ``like``'s dtype and device (cached)."""
    per_op = _TENSORS.setdefault(op, {})
    key = (name, like.dtype, like.device)
    if key not in per_op:
        per_op[key] = torch.as_tensor(np.asarray(getattr(op, name)), dtype=like.dtype,
                                      device=like.device)
    return per_op[key]


def _dense(op: O.Dense, x: torch.Tensor) -> torch.Tensor:
    y = torch.movedim(x, op.axis, -1) @ param(op, "weight", x).T
    if op.bias is not None:
        y = y + param(op, "bias", x)
    return torch.movedim(y, -1, op.axis)


def _conv(op: O.Conv, x: torch.Tensor) -> torch.Tensor:
    t, l, b, r = op.pads
    x = F.pad(x, (l, r, t, b))
    bias = param(op, "bias", x) if op.bias is not None else None
    return F.conv2d(x, param(op, "weight", x), bias, op.stride, 0, op.dilation, op.groups)


def _conv_transpose(op: O.ConvTranspose, x: torch.Tensor) -> torch.Tensor:
    y = F.conv_transpose2d(x, param(op, "weight", x), None, op.stride, 0, 0, op.groups,
                           op.dilation)
    y = F.pad(y, (0, op.output_padding[1], 0, op.output_padding[0]))
    t, l, b, r = op.pads
    y = y[..., t : y.shape[-2] - b, l : y.shape[-1] - r]
    if op.bias is not None:
        y = y + param(op, "bias", x).reshape(-1, 1, 1)
    return y


def _slice(op: O.Slice, x: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(op.start, op.stop, op.step, device=x.device)
    return torch.index_select(x, op.axis, idx)


def _pad(op: O.Pad, x: torch.Tensor) -> torch.Tensor:
    flat: list[int] = []
    for begin, end in reversed(op.pads):
        flat += [begin, end]
    return F.pad(x, flat, value=op.value)


def _pool_sum(x: torch.Tensor, op: O.AvgPool | O.MaxPool) -> torch.Tensor:
    return F.avg_pool2d(x, op.kernel, op.stride, 0, op.ceil_mode, True, 1)


def _avg_pool(op: O.AvgPool, x: torch.Tensor) -> torch.Tensor:
    t, l, b, r = op.pads
    summed = _pool_sum(F.pad(x, (l, r, t, b)), op)
    ones = torch.ones(x.shape[-2:], dtype=x.dtype, device=x.device)[None, None]
    if op.count_include_pad:
        ones = F.pad(ones, (l, r, t, b), value=1.0)
    else:
        ones = F.pad(ones, (l, r, t, b))
    return summed / _pool_sum(ones, op)[0, 0]


def _max_pool(op: O.MaxPool, x: torch.Tensor) -> torch.Tensor:
    t, l, b, r = op.pads
    if any(op.pads):
        x = F.pad(x, (l, r, t, b), value=float("-inf"))
    return F.max_pool2d(x, op.kernel, op.stride, 0, op.dilation, op.ceil_mode)


def _softmax(op: O.Softmax, x: torch.Tensor) -> torch.Tensor:
    if op.flatten:
        shape = x.shape
        lead = int(np.prod(shape[: op.axis], dtype=np.int64))
        return torch.softmax(x.reshape(lead, -1), dim=-1).reshape(shape)
    return torch.softmax(x, dim=op.axis)


def _group_sort(op: O.GroupSort, x: torch.Tensor) -> torch.Tensor:
    groups = torch.as_tensor(op.groups, device=x.device)
    xm = torch.movedim(x, op.axis, -1)
    gathered = xm[..., groups]  # (..., n_groups, g)
    ordered = torch.sort(gathered, dim=-1, descending=True).values.flatten(-2)
    inverse = torch.as_tensor(np.argsort(op.groups.reshape(-1)), device=x.device)
    return torch.movedim(ordered[..., inverse], -1, op.axis)


def _extremum(op: O.Extremum, *xs: torch.Tensor) -> torch.Tensor:
    fn = torch.maximum if op.mode == "max" else torch.minimum
    y = xs[0]
    for other in xs[1:]:
        y = fn(y, other)
    return y


FORWARD: dict[type, Callable[..., torch.Tensor]] = {
    O.Dense: _dense,
    O.Conv: _conv,
    O.ConvTranspose: _conv_transpose,
    O.Scale: lambda op, x: x * param(op, "scale", x) + param(op, "shift", x),
    O.Add: lambda op, *xs: sum(c * x for c, x in zip(op.coeffs, xs, strict=True)),
    O.Concat: lambda op, *xs: torch.cat(xs, dim=op.axis),
    O.Reshape: lambda op, x: x.reshape(op.shape),
    O.Transpose: lambda op, x: x.permute(op.perm),
    O.Slice: _slice,
    O.Pad: _pad,
    O.AvgPool: _avg_pool,
    O.GlobalAvgPool: lambda op, x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    O.Relu: lambda op, x: torch.relu(x),
    O.LeakyRelu: lambda op, x: F.leaky_relu(x, op.alpha),
    O.Sigmoid: lambda op, x: torch.sigmoid(x),
    O.Tanh: lambda op, x: torch.tanh(x),
    O.Clip: lambda op, x: torch.clamp(x, op.low, op.high),
    O.Elu: lambda op, x: F.elu(x, op.alpha),
    O.Softplus: lambda op, x: torch.logaddexp(x, torch.zeros_like(x)),
    O.Gelu: lambda op, x: F.gelu(x),
    O.Silu: lambda op, x: F.silu(x),
    O.Softmax: _softmax,
    O.GroupSort: _group_sort,
    O.MaxPool: _max_pool,
    O.Extremum: _extremum,
    O.Reduce: lambda op, x: (torch.amax if op.mode == "max" else torch.amin)(
        x, dim=op.axes, keepdim=op.keepdims),
}


def apply(op: O.Op, *xs: torch.Tensor) -> torch.Tensor:
    try:
        fn = FORWARD[type(op)]
    except KeyError:  # pragma: no cover - every IR op has a forward
        raise NotImplementedError(f"no forward for IR op {op.kind}") from None
    return fn(op, *xs)


def run(graph: Graph, x: torch.Tensor, *, return_all: bool = False):
    """Evaluate ``graph`` on one input tensor of shape ``graph.input_shape``."""
    values = {graph.input: x}
    for node in graph.nodes:
        values[node.output] = apply(node.op, *(values[i] for i in node.inputs))
    return values if return_all else values[graph.output]


def run_batch(graph: Graph, xs: torch.Tensor) -> torch.Tensor:
    """Evaluate on a batch: ``xs`` has shape (B, *graph.input_shape)."""
    return torch.func.vmap(lambda x: run(graph, x))(xs)


def as_input(graph: Graph, x: np.ndarray | torch.Tensor, dtype=torch.float64) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=dtype)
    return t.reshape(graph.input_shape)
