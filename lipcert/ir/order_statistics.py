"""Recognise GroupSort and MaxMin in any export form by evaluating order statistics.

Exporters write a sort of small groups in many ways: Max/Min of two halves, ReduceMax and
ReduceMin over a reshaped pair axis followed by Concat (deel-torchlip's GroupSort2), TopK of
reshaped groups (FullSort, GroupSort(n)), amax/amin pairs stacked along a new axis, with
Slice, Transpose, Reshape and Concat in between. Rather than one pattern per form, the pass
evaluates a region of such ops *symbolically*: every element of every tensor is a term
"the r-th largest of the source elements S". Layout ops move terms, Max/Min of disjoint
maxima (minima) unite their sets, Reduce does the same along its axes, and a sort of single
elements ranks them. The region is a GroupSort exactly when its output holds, for disjoint
groups S of one size g covering the source, every rank 0..g-1 of each S once. It is then
replaced by one GroupSort along the axis its groups live on, followed by a permutation along
that axis (a Dense with a 0/1 matrix, norm 1) when the output order differs from the
source's, and a Reshape to the output shape. Anything else (overlapping pairs, a max
without its min) is left as it is and said in the graph's notes: naive still bounds it
(max/min are 1-Lipschitz), methods that need GroupSort refuse it by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops as O
from .graph import Node

#: source tensors above this many elements are not evaluated symbolically
MAX_ELEMENTS = 1 << 16

LAYOUT = (O.Reshape, O.Transpose, O.Slice, O.Concat)
ORDER = (O.Extremum, O.Reduce, O.GroupSort)


class NotGroupSort(Exception):
    """The region is not a GroupSort; the message says why."""


@dataclass(frozen=True)
class Term:
    """The ``rank``-th largest (0: the maximum) of the source elements ``members``, or with
    ``negated`` of their negatives: -(the (|members| - 1 - rank)-th largest of them)."""

    members: frozenset[int]
    rank: int
    negated: bool = False

    @property
    def is_max(self) -> bool:
        return self.rank == 0

    @property
    def is_min(self) -> bool:
        return self.rank == len(self.members) - 1


def _unite(terms, mode: str) -> Term:
    sets = [t.members for t in terms]
    union = frozenset().union(*sets)
    if sum(len(s) for s in sets) != len(union):
        raise NotGroupSort(f"a {mode} over overlapping groups")
    negated = _same_sign(terms)
    if mode == "max" and all(t.is_max for t in terms):
        return Term(union, 0, negated)
    if mode == "min" and all(t.is_min for t in terms):
        return Term(union, len(union) - 1, negated)
    raise NotGroupSort(f"a {mode} of values that are not {mode}ima of their groups")


def _same_sign(terms) -> bool:
    signs = {t.negated for t in terms}
    if len(signs) != 1:
        raise NotGroupSort("a max/min/sort of values and negated values")
    return signs.pop()


def is_negation(op: O.Op) -> bool:
    """A Scale that is x -> -x (tf2onnx writes an ascending sort as Neg, TopK, Neg)."""
    return isinstance(op, O.Scale) and bool(np.all(np.asarray(op.scale) == -1.0)) and \
        bool(np.all(np.asarray(op.shift) == 0.0))


def in_region(op: O.Op) -> bool:
    """Ops a GroupSort export form is written with: layout, max/min/sort, negation."""
    return isinstance(op, LAYOUT + ORDER) or is_negation(op)


def _negate(op: O.Scale, x: np.ndarray) -> np.ndarray:
    if np.broadcast_shapes(np.shape(op.scale), x.shape) != x.shape:
        raise NotGroupSort("a negation that broadcasts")
    out = np.empty(x.shape, dtype=object)
    for idx in np.ndindex(x.shape):
        t = x[idx]
        out[idx] = Term(t.members, len(t.members) - 1 - t.rank, not t.negated)
    return out


def _extremum(op: O.Extremum, *xs: np.ndarray) -> np.ndarray:
    if any(x.shape != xs[0].shape for x in xs):
        raise NotGroupSort("a max/min with broadcasting")
    out = np.empty(xs[0].shape, dtype=object)
    for idx in np.ndindex(out.shape):
        out[idx] = _unite([x[idx] for x in xs], op.mode)
    return out


def _reduce(op: O.Reduce, x: np.ndarray) -> np.ndarray:
    moved = np.moveaxis(x, op.axes, range(x.ndim - len(op.axes), x.ndim))
    kept = moved.shape[: x.ndim - len(op.axes)]
    flat = moved.reshape(*kept, -1)
    out = np.empty(kept, dtype=object)
    for idx in np.ndindex(kept):
        out[idx] = _unite(list(flat[idx]), op.mode)
    if op.keepdims:
        out = out.reshape([1 if a in op.axes else d for a, d in enumerate(x.shape)])
    return out


def _group_sort(op: O.GroupSort, x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, dtype=object)
    xm, om = np.moveaxis(x, op.axis, -1), np.moveaxis(out, op.axis, -1)
    for idx in np.ndindex(xm.shape[:-1]):
        for group in op.groups:
            terms = [xm[idx][p] for p in group]
            if not all(len(t.members) == 1 for t in terms):
                raise NotGroupSort("a sort of values that are not single elements")
            negated = _same_sign(terms)
            union = frozenset().union(*(t.members for t in terms))
            for r, p in enumerate(group):
                om[idx][p] = Term(union, r, negated)
    return out


def _slice(op: O.Slice, x: np.ndarray) -> np.ndarray:
    return np.take(x, np.arange(op.start, op.stop, op.step), axis=op.axis)


SYMBOLIC = {
    O.Reshape: lambda op, x: x.reshape(op.shape),
    O.Transpose: lambda op, x: np.transpose(x, op.perm),
    O.Slice: _slice,
    O.Concat: lambda op, *xs: np.concatenate(xs, axis=op.axis),
    O.Extremum: _extremum,
    O.Reduce: _reduce,
    O.GroupSort: _group_sort,
    O.Scale: _negate,  # only negations enter a region (in_region)
}


def region(sink: Node, producer) -> tuple[list[Node], set[str]]:
    """The layout/order nodes that ``sink`` is computed from, in evaluation order, and the
    values that enter the region from outside it."""
    nodes: dict[str, Node] = {}
    sources: set[str] = set()
    stack = [sink]
    while stack:
        node = stack.pop()
        if node.output in nodes:
            continue
        nodes[node.output] = node
        for value in node.inputs:
            prev = producer(value)
            if prev is not None and in_region(prev.op):
                stack.append(prev)
            else:
                sources.add(value)
    order: list[Node] = []
    done: set[str] = set(sources)

    def visit(node: Node) -> None:
        if node.output in done:
            return
        for value in node.inputs:
            if value in nodes:
                visit(nodes[value])
        done.add(node.output)
        order.append(node)

    visit(sink)
    return order, sources


def evaluate_terms(nodes: list[Node], source: str, shape: tuple[int, ...]) -> np.ndarray:
    """The sink's terms, each source element being its own (rank 0) group."""
    values: dict[str, np.ndarray] = {}
    base = np.empty(int(np.prod(shape)), dtype=object)
    for i in range(base.size):
        base[i] = Term(frozenset((i,)), 0)
    values[source] = base.reshape(shape)
    for node in nodes:
        values[node.output] = SYMBOLIC[type(node.op)](node.op, *(values[v] for v in node.inputs))
    return values[nodes[-1].output]


@dataclass(frozen=True)
class Canonical:
    """GroupSort(axis, groups) of the source, then ``permutation`` along ``axis`` (None:
    none needed; else output position p takes the sorted value at ``permutation[p]``)."""

    axis: int
    groups: np.ndarray
    permutation: np.ndarray | None
    negate: bool = False  # then the output is the negation of that


def canonical_group_sort(terms: np.ndarray, shape: tuple[int, ...]) -> Canonical:
    """Read the sink's terms (in the source's shape) as a GroupSort along one axis, negated
    when every output term is (e.g. a descending sort of -x whose negation the next layer
    absorbed)."""
    flat = terms.reshape(-1)
    if flat.size != int(np.prod(shape)):
        raise NotGroupSort("the output does not have as many values as the source")
    if not all(isinstance(t, Term) for t in flat):
        raise NotGroupSort("an output value that is not an order statistic")
    negate = _same_sign(flat)
    if negate:  # -(r-th largest of -x_S) = (|S| - 1 - r)-th largest of x_S
        flat = np.array([Term(t.members, len(t.members) - 1 - t.rank) for t in flat],
                        dtype=object)
        canon = canonical_group_sort(flat, shape)
        return Canonical(canon.axis, canon.groups, canon.permutation, True)
    seen: dict[frozenset[int], dict[int, int]] = {}
    for j, term in enumerate(flat):
        if not isinstance(term, Term):
            raise NotGroupSort("an output value that is not an order statistic")
        ranks = seen.setdefault(term.members, {})
        if term.rank in ranks:
            raise NotGroupSort("an order statistic used twice")
        ranks[term.rank] = j
    sizes = {len(m) for m in seen}
    if len(sizes) != 1 or sum(len(m) for m in seen) != flat.size:
        raise NotGroupSort("groups of different sizes, or not covering the source")
    (g,) = sizes
    if g < 2:
        raise NotGroupSort("no values are compared")
    for ranks in seen.values():
        if len(ranks) != g:
            raise NotGroupSort("a group whose sorted values are not all kept")
    coords = {}
    for members, ranks in seen.items():
        coords[members] = (np.array(np.unravel_index(sorted(members), shape)).T,
                           np.array(np.unravel_index([ranks[r] for r in range(g)], shape)).T)
    axis = _group_axis(coords.values(), len(shape))
    return _along_axis(coords, shape, axis, g)


def _group_axis(coords, rank: int) -> int:
    """The one axis along which every group's members and output positions differ."""
    for axis in range(rank):
        others = [a for a in range(rank) if a != axis]
        if all(np.all(inp[:, others] == inp[0, others]) and
               np.all(out[:, others] == inp[0, others]) for inp, out in coords):
            return axis
    raise NotGroupSort("groups that span several axes")


def _along_axis(coords: dict, shape: tuple[int, ...], axis: int, g: int) -> Canonical:
    """Groups along ``axis``, the same at every other coordinate (else not one GroupSort)."""
    others = [a for a in range(len(shape)) if a != axis]
    layout: dict[tuple, set[tuple]] = {}
    for inp, out in coords.values():
        key = tuple(inp[0, others])
        layout.setdefault(key, set()).add((tuple(inp[:, axis]), tuple(out[:, axis])))
    patterns = list(layout.values())
    if any(p != patterns[0] for p in patterns):
        raise NotGroupSort("groups that differ between positions of the other axes")
    pairs = sorted(patterns[0])
    groups = np.array([inp for inp, _ in pairs], dtype=np.int64)  # members, ascending
    outs = np.array([out for _, out in pairs], dtype=np.int64)  # output position of rank r
    if all(set(i) == set(o) for i, o in pairs):  # each group is written where it was read
        return Canonical(axis, outs, None)
    perm = np.empty(shape[axis], dtype=np.int64)
    for members, out in zip(groups, outs, strict=True):
        for r in range(g):  # the sort writes rank r at members[r]; it belongs at out[r]
            perm[out[r]] = members[r]
    return Canonical(axis, groups, perm)
