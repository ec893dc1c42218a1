"""Matrix-free forms of the unrolled linear maps of an :class:`~.lowering.AffineDag`.

A map M[k][j] of the DAG is the exact linear part of a run of IR ops (convolutions, pooling,
padding, residual adds, ...) from base j to the pre-activation z_k. Bound propagation
multiplies coefficient matrices with many rows by these maps: P @ M (backward substitution
through the map, CROWN) and P @ M^T (the adjoint recursion of the Jacobian). Done densely,
each product costs rows * n_k * n_j; replaying the ops on the rows costs rows * (the ops'
work), far less for convolutions (a 3x3 conv touches 9 * C_in inputs per output, not all
n_j). P @ M^T replays the ops' forward on the rows (as a batch of inputs), P @ M is its
vector-Jacobian product (the transpose of a linear map, taken by autograd).

Both are the same float64 arithmetic as the dense map (built by the same forward on the
columns of the identity), in a different order: the rounding is of the same kind and
size, and the callers' relative slack covers it as it covers the dense products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from . import evaluate
from . import ops as O

#: rows per replayed batch (bounds the memory of the ops' intermediate tensors)
CHUNK_ROWS = 1024


@dataclass(frozen=True)
class LinearOperator:
    """x -> M x for x in R^{n_in} (flat), as a function on batches (B, n_in) -> (B, n_out),
    on the device of x (the ops' arrays follow it: :func:`~.evaluate.param`).

    ``cost``: multiply-adds per row, to compare with the n_out * n_in of the dense matrix."""

    apply: Callable[[torch.Tensor], torch.Tensor]
    n_in: int
    n_out: int
    cost: int

    def times_transpose(self, p: torch.Tensor) -> torch.Tensor:
        """p @ M^T for p of shape (..., n_in)."""
        lead = p.shape[:-1]
        flat = p.reshape(-1, self.n_in)
        out = [self.apply(flat[i:i + CHUNK_ROWS]) for i in range(0, flat.shape[0], CHUNK_ROWS)]
        return torch.cat(out).reshape(*lead, self.n_out)

    def times(self, p: torch.Tensor) -> torch.Tensor:
        """p @ M for p of shape (..., n_out): the vector-Jacobian product of the map."""
        lead = p.shape[:-1]
        flat = p.reshape(-1, self.n_out)
        out = []
        for i in range(0, flat.shape[0], CHUNK_ROWS):
            rows = flat[i:i + CHUNK_ROWS]
            zero = torch.zeros(rows.shape[0], self.n_in, dtype=rows.dtype, device=rows.device)
            _, vjp = torch.func.vjp(self.apply, zero)
            out.append(vjp(rows)[0])
        return torch.cat(out).reshape(*lead, self.n_in)


def identity(n: int) -> LinearOperator:
    return LinearOperator(lambda x: x, n, n, 0)


def dense(m: torch.Tensor) -> LinearOperator:
    """The dense matrix itself as an operator (the fallback where replaying costs more), on
    the device of the rows it multiplies (a copy per device, made once)."""
    copies = {m.device: m}

    def apply(x: torch.Tensor) -> torch.Tensor:
        if x.device not in copies:
            copies[x.device] = m.to(x.device)
        return x @ copies[x.device].T

    return LinearOperator(apply, m.shape[1], m.shape[0], m.numel())


def op_cost(op: O.Op, out_shape: Sequence[int]) -> int:
    """Multiply-adds of one application of ``op`` producing ``out_shape``."""
    n = int(np.prod(out_shape))
    if isinstance(op, O.Conv):
        per = int(np.prod(op.weight.shape[1:]))
        return n * per
    if isinstance(op, O.ConvTranspose):
        c_in, c_out_g, kh, kw = op.weight.shape
        return n * max(1, (c_in // op.groups) * kh * kw // max(1, op.stride[0] * op.stride[1]))
    if isinstance(op, O.Dense):
        return n * int(op.weight.shape[1])
    if isinstance(op, O.AvgPool):
        return n * int(np.prod(op.kernel))
    return n  # elementwise and layout ops


def compose(lin: O.Op, in_shapes: Sequence[Sequence[int]], out_shape: Sequence[int],
            inputs: Sequence[LinearOperator | None], n_in: int) -> LinearOperator:
    """The operator x -> lin(A_1 x, ..., A_m x) (flat), where A_i are ``inputs`` (None: the
    input does not depend on this base and is zero). ``lin`` must be an op's linear part."""
    shapes = [tuple(s) for s in in_shapes]
    n_out = int(np.prod(out_shape))

    def single(*xs: torch.Tensor) -> torch.Tensor:
        return evaluate.apply(lin, *xs)

    batched = torch.func.vmap(single)

    def apply(x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        args = [a.apply(x).reshape(b, *s) if a is not None else
                torch.zeros((b, *s), dtype=x.dtype, device=x.device)
                for a, s in zip(inputs, shapes, strict=True)]
        return batched(*args).reshape(b, n_out)

    cost = sum(a.cost for a in inputs if a is not None) + op_cost(lin, out_shape)
    return LinearOperator(apply, n_in, n_out, cost)
