"""A graph as a DAG of dense affine maps between elementwise activations.

Every value of the IR graph is an affine function of the *bases*: base 0 is the flattened
input x, base k >= 1 is the output of the k-th activation node. Linear ops (Dense, Conv,
ConvTranspose, Scale, Add, Concat, layout and pooling ops) are applied to the columns of
these affine maps with the evaluator's own torch forward, so the unrolled matrices are the
ops' exact linear parts (in float64). Then

    z_k = sum_{j<k} M[k][j] B_j + c_k,   B_k = sigma_k(z_k),   f = sum_j M_out[j] B_j + c_out,

which is the form bound propagation works on (residual connections are extra M[k][j]).
Used by the ``local`` estimator and by LipSDP for conv layers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from ..errors import MethodNotApplicable
from . import evaluate
from . import linear_operators as L
from . import ops as O
from .graph import Graph

MAX_ENTRIES = 30_000_000

_ACTIVATIONS = O.ELEMENTWISE_ACTIVATIONS
LINEAR_OPS = (O.Dense, O.Conv, O.ConvTranspose, O.Scale, O.Add, O.Concat, O.Reshape, O.Transpose,
           O.Slice, O.Pad, O.AvgPool, O.GlobalAvgPool)
UNROLLABLE = LINEAR_OPS + _ACTIVATIONS  # the IR ops build_affine_dag accepts
CHAIN_LINEAR_OPS = tuple(op for op in LINEAR_OPS if op not in (O.Add, O.Concat))  # 1 input


#: a map gets a matrix-free operator when replaying its ops costs at most this fraction of
#: its dense matrix's entries: float64 convolutions run at about 6 GMAC/s on this CPU where
#: dense float64 products reach 90 (bench/local.py), so replaying must save more than 16x
IMPLICIT_FRACTION = 1 / 16


@dataclass
class Affine:
    """sum_j maps[j] @ B_j + bias, with maps[j] of shape (size, n_j).

    ``ops[j]``, where present, is maps[j] as a matrix-free operator (the ops that built it,
    replayed: :mod:`.linear_operators`) that is much cheaper than the dense matrix for
    products with many rows. It must equal maps[j]: code that builds a new Affine from
    changed maps leaves ``ops`` empty."""

    maps: dict[int, torch.Tensor]
    bias: torch.Tensor
    ops: dict[int, L.LinearOperator] = field(default_factory=dict)

    @property
    def entries(self) -> int:
        return sum(m.numel() for m in self.maps.values())


@dataclass
class AffineDag:
    """Bases 0..K (0 = input); ``pre[k - 1]`` is z_k, ``acts[k - 1]`` is sigma_k."""

    sizes: list[int]
    acts: list[O.Op]
    pre: list[Affine]
    out: Affine
    sources: list[str]
    #: copies of this DAG on other devices (:meth:`to`), made once each
    copies: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_acts(self) -> int:
        return len(self.acts)

    def entries(self) -> int:
        return sum(a.entries for a in self.pre) + self.out.entries

    @property
    def device(self) -> torch.device:
        return self.out.bias.device

    def to(self, device: str | torch.device) -> AffineDag:
        """The same DAG with its matrices and biases on ``device`` (itself when they are
        there already; the matrix-free operators follow the device of what they multiply)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self.device == device:
            return self
        if device in self.copies:
            return self.copies[device]

        def moved(a: Affine) -> Affine:
            return Affine({j: m.to(device) for j, m in a.maps.items()}, a.bias.to(device),
                          dict(a.ops))

        copy = AffineDag(list(self.sizes), list(self.acts), [moved(a) for a in self.pre],
                         moved(self.out), list(self.sources))
        self.copies[device] = copy
        return copy

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Pre-activations z_1..z_K and the output at a batch of points x (B, n_0)."""
        bases, zs = [x], []
        for affine, op in zip(self.pre, self.acts, strict=True):
            z = apply_affine(affine, bases)
            zs.append(z)
            bases.append(evaluate.apply(op, z))
        return zs, apply_affine(self.out, bases)


def apply_affine(affine: Affine, bases: list[torch.Tensor]) -> torch.Tensor:
    """affine applied to a batch: bases[j] has shape (B, n_j)."""
    y = affine.bias.expand(bases[0].shape[0], -1).clone()
    for j, m in affine.maps.items():
        y = y + bases[j] @ m.T
    return y


def linear_part(op: O.Op) -> O.Op:
    """The op without its constant term (bias, shift, pad value): exact linear part."""
    if isinstance(op, (O.Dense, O.Conv, O.ConvTranspose)) and op.bias is not None:
        return replace(op, bias=None)
    if isinstance(op, O.Scale):
        return replace(op, shift=np.zeros_like(op.shift))
    if isinstance(op, O.Pad) and op.value != 0:
        return replace(op, value=0.0)
    return op


def _apply_linear(op: O.Op, node_shape, in_shapes, inputs: list[Affine]) -> Affine:
    dtype = torch.float64
    biases = [a.bias.reshape(shape) for a, shape in zip(inputs, in_shapes, strict=True)]
    with torch.no_grad():
        bias = evaluate.apply(op, *biases).reshape(-1)
        lin = linear_part(op)
        maps: dict[int, torch.Tensor] = {}
        operators: dict[int, L.LinearOperator] = {}
        bases = sorted({j for a in inputs for j in a.maps})
        for j in bases:
            n_j = next(a.maps[j].shape[1] for a in inputs if j in a.maps)
            cols = [a.maps[j].T.reshape(n_j, *shape) if j in a.maps else
                    torch.zeros((n_j, *shape), dtype=dtype)
                    for a, shape in zip(inputs, in_shapes, strict=True)]
            out = torch.func.vmap(lambda *xs, _lin=lin: evaluate.apply(_lin, *xs))(*cols)
            maps[j] = out.reshape(n_j, -1).T.contiguous()
            parts = [(a.ops.get(j) or L.dense(a.maps[j])) if j in a.maps else None
                     for a in inputs]
            operator = L.compose(lin, in_shapes, node_shape, parts, n_j)
            if operator.cost <= IMPLICIT_FRACTION * maps[j].numel():
                operators[j] = operator
    size = int(np.prod(node_shape))
    kept = {j: m for j, m in maps.items() if torch.any(m != 0)}
    return Affine(kept, bias.reshape(size), {j: op for j, op in operators.items() if j in kept})


def _identity(size: int, base: int) -> Affine:
    """B_base itself, as the value of a node."""
    return Affine({base: torch.eye(size, dtype=torch.float64)},
                  torch.zeros(size, dtype=torch.float64), {base: L.identity(size)})


def flat_group_sort(op: O.GroupSort, shape: tuple[int, ...]) -> O.GroupSort:
    """The same GroupSort on the flattened tensor: its groups as flat positions (one group per
    group and position of the other axes, e.g. channel pairs at every pixel)."""
    index = np.moveaxis(np.arange(int(np.prod(shape))).reshape(shape), op.axis, -1)
    groups = index[..., np.asarray(op.groups, dtype=np.int64)]  # (..., n_groups, g)
    return O.GroupSort(1, groups.reshape(-1, groups.shape[-1]))


def build_affine_dag(graph: Graph, method: str, max_entries: int = MAX_ENTRIES) -> AffineDag:
    """Unroll ``graph`` into an :class:`AffineDag`; ops other than linear ones and elementwise
    activations are refused by node name."""
    n0 = int(np.prod(graph.input_shape))
    values: dict[str, Affine] = {graph.input: _identity(n0, 0)}
    sizes, acts, pre, sources = [n0], [], [], []
    total = n0 * n0
    for node in graph.nodes:
        op = node.op
        size = int(np.prod(node.shape))
        if isinstance(op, (*_ACTIVATIONS, O.GroupSort)):
            k = len(sizes)
            pre.append(values[node.inputs[0]])
            acts.append(flat_group_sort(op, node.shape) if isinstance(op, O.GroupSort) else op)
            sizes.append(size)
            sources.append(node.source)
            values[node.output] = _identity(size, k)
            continue
        if not isinstance(op, LINEAR_OPS):
            raise MethodNotApplicable(
                f"method {method} does not support op {op.kind} at node {node.source!r}")
        inputs = [values[i] for i in node.inputs]
        expected = size * sum(sizes[j] for j in {j for a in inputs for j in a.maps})
        if total + expected > max_entries:
            raise MethodNotApplicable(
                f"method {method} unrolls linear layers into matrices, and node "
                f"{node.source!r} takes the total past {max_entries:,} entries; raise "
                "-o max_entries=N if memory allows")
        values[node.output] = _apply_linear(op, node.shape,
                                            [graph.shape_of(i) for i in node.inputs], inputs)
        total += values[node.output].entries
    return AffineDag(sizes, acts, pre, values[graph.output], sources)


_DAG_CACHE: list[tuple[weakref.ref, str, int, AffineDag]] = []


def cached_affine_dag(graph: Graph, method: str, max_entries: int = MAX_ENTRIES) -> AffineDag:
    """:func:`build_affine_dag`, remembered for the last few graphs (certification bounds the
    same graph on every sample's box). Graphs are immutable, so the unrolled DAG stays valid."""
    for ref, m, limit, dag in _DAG_CACHE:
        if ref() is graph and m == method and limit == max_entries:
            return dag
    dag = build_affine_dag(graph, method, max_entries)
    _DAG_CACHE.insert(0, (weakref.ref(graph), method, max_entries, dag))
    del _DAG_CACHE[4:]
    return dag
