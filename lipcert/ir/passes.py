"""Canonicalising passes: exact rewrites that make graphs small and easy to bound.

- drop identities (same-shape Reshape, full Slice, unit Scale);
- fold elementwise Scale (BatchNorm, input normalisation) into the neighbouring Dense,
  Conv or ConvTranspose, pushing it through Reshape/Transpose first;
- merge consecutive Dense maps and consecutive Scales (exact, and tighter for product
  bounds: ||W2 W1|| <= ||W2|| ||W1||);
- recognise GroupSort and MaxMin in any export form (Concat(Max(a, b), Min(a, b)) of two
  halves, ReduceMax/ReduceMin over reshaped pairs, TopK of reshaped groups, ...) by the
  symbolic evaluation of :mod:`order_statistics`;
- remove dead nodes.
Every rewrite is exact; import fidelity is checked on the canonical graph.
"""

from __future__ import annotations

import numpy as np

from . import ops as O
from . import order_statistics as OS
from .graph import Graph, Node


def _compress(a: np.ndarray) -> np.ndarray:
    """Shrink every axis along which ``a`` is constant to size 1."""
    for axis in range(a.ndim):
        if a.shape[axis] > 1 and np.all(a == a.take([0], axis=axis)):
            a = a.take([0], axis=axis)
    return a


def _varies_only_along(a: np.ndarray, axis: int) -> bool:
    return all(d == 1 for k, d in enumerate(a.shape) if k != axis)


def _vector(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    return np.broadcast_to(a.reshape(-1), (n,)).astype(np.float64)


class _Work:
    """The node list under rewriting, indexed so that every query is O(1): nodes by output
    value, users of each value, and a position per node (the order is restored at the end).
    Keeps the passes linear in the number of nodes (a 10^5-node chain in seconds)."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.output = graph.output
        self.by_output: dict[str, Node] = {}
        self.position: dict[str, float] = {}
        self.users: dict[str, dict[str, None]] = {graph.input: {}}  # ordered sets
        self.notes: list[str] = []  # what a rule looked at and left (said in the graph notes)
        for k, node in enumerate(graph.nodes):
            self._add(node, float(k))

    # -- indexed queries --------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        return sorted(self.by_output.values(), key=lambda n: self.position[n.output])

    def alive(self, node: Node) -> bool:
        return self.by_output.get(node.output) is node

    def uses(self, value: str) -> list[Node]:
        return [self.by_output[o] for o in self.users.get(value, ())]

    def sole_use(self, value: str) -> Node | None:
        users = self.users.get(value, {})
        if len(users) == 1 and value != self.output:
            return self.by_output[next(iter(users))]
        return None

    def shape_of(self, value: str) -> tuple[int, ...]:
        if value == self.graph.input:
            return self.graph.input_shape
        return self.by_output[value].shape

    def producer(self, value: str) -> Node | None:
        return self.by_output.get(value)

    # -- edits ------------------------------------------------------------------------
    def _add(self, node: Node, position: float) -> None:
        self.by_output[node.output] = node
        self.position[node.output] = position
        self.users.setdefault(node.output, {})
        for i in node.inputs:
            self.users.setdefault(i, {})[node.output] = None

    def remove(self, node: Node) -> float:
        del self.by_output[node.output]
        position = self.position.pop(node.output)
        for i in node.inputs:
            self.users.get(i, {}).pop(node.output, None)
        return position

    def replace(self, old: Node, new: Node) -> None:
        """``new`` takes ``old``'s place in the order (its output may differ)."""
        self._add(new, self.remove(old))

    def insert_at(self, position: float, node: Node) -> None:
        self._add(node, position)

    def bypass(self, node: Node) -> None:
        """Remove a node whose output equals its single input."""
        src = node.inputs[0]
        if self.output == node.output and self.producer(src) is None:
            return  # input is output: keep the identity
        self.remove(node)
        for user in self.uses(node.output):
            renamed = Node(user.op, tuple(src if i == node.output else i for i in user.inputs),
                           user.output, user.shape, user.source)
            self.replace(user, renamed)
        if self.output == node.output:
            self.output = src

    def result(self) -> Graph:
        nodes = self.nodes
        live = {self.output}
        kept = []
        for n in reversed(nodes):
            if n.output in live:
                kept.append(n)
                live.update(n.inputs)
        return self.graph.with_nodes(list(reversed(kept)), output=self.output)


def _is_identity(node: Node, work: _Work) -> bool:
    op = node.op
    if isinstance(op, O.Reshape):
        return work.shape_of(node.inputs[0]) == node.shape
    if isinstance(op, O.Scale):
        return bool(np.all(op.scale == 1) and np.all(op.shift == 0))
    if isinstance(op, O.Transpose):
        return op.perm == tuple(range(len(op.perm)))
    return False


def _fold_scale_into_producer(node: Node, work: _Work) -> bool:
    """Linear layer -> Scale  ==>  one linear layer with scaled rows and bias."""
    op = node.op
    if not isinstance(op, O.Scale):
        return False
    prev = work.producer(node.inputs[0])
    if prev is None or work.sole_use(prev.output) is not node:
        return False
    p = prev.op
    if isinstance(p, O.Dense) and _varies_only_along(op.scale, p.axis) \
            and _varies_only_along(op.shift, p.axis):
        m = p.weight.shape[0]
        s, t = _vector(op.scale, p.axis, m), _vector(op.shift, p.axis, m)
        bias = s * (p.bias if p.bias is not None else 0.0) + t
        new = O.Dense(s[:, None] * p.weight, bias, p.axis)
    elif isinstance(p, O.Conv | O.ConvTranspose) and _varies_only_along(op.scale, 1) \
            and _varies_only_along(op.shift, 1):
        c_out = node.shape[1]
        s, t = _vector(op.scale, 1, c_out), _vector(op.shift, 1, c_out)
        bias = s * (p.bias if p.bias is not None else 0.0) + t
        if isinstance(p, O.Conv):
            new = O.Conv(p.weight * s[:, None, None, None], bias, p.stride, p.pads, p.dilation,
                         p.groups)
        else:
            g = p.groups
            ci, cog, kh, kw = p.weight.shape
            w = p.weight.reshape(g, ci // g, cog, kh, kw) * s.reshape(g, 1, cog, 1, 1)
            new = O.ConvTranspose(w.reshape(ci, cog, kh, kw), bias, p.stride, p.pads,
                                  p.output_padding, p.dilation, p.groups)
    else:
        return False
    work.remove(node)
    work.replace(prev, Node(new, prev.inputs, node.output, node.shape,
                            f"{prev.source}+{node.source}"))
    return True


def _fold_scale_into_consumer(node: Node, work: _Work) -> bool:
    """Scale -> linear layer  ==>  one linear layer (input normalisation folding)."""
    op = node.op
    if not isinstance(op, O.Scale):
        return False
    nxt = work.sole_use(node.output)
    if nxt is None:
        return False
    n_op = nxt.op
    if isinstance(n_op, O.Reshape | O.Transpose):
        # move the Scale after the layout op, with its arrays laid out accordingly
        in_shape = work.shape_of(node.inputs[0])
        arrays = []
        for a in (op.scale, op.shift):
            full = np.broadcast_to(a, in_shape)
            full = full.reshape(n_op.shape) if isinstance(n_op, O.Reshape) \
                else full.transpose(n_op.perm)
            arrays.append(_compress(np.ascontiguousarray(full)))
        if work.sole_use(nxt.output) is None or not isinstance(
                work.sole_use(nxt.output).op, O.Dense | O.Conv | O.Scale):
            return False
        moved_layout = Node(n_op, node.inputs, nxt.output + "~", nxt.shape, nxt.source)
        moved_scale = Node(O.Scale(*arrays), (moved_layout.output,), nxt.output, nxt.shape,
                           node.source)
        at_node, at_next = work.remove(node), work.remove(nxt)
        work.insert_at(at_node, moved_layout)
        work.insert_at(at_next, moved_scale)
        return True
    if isinstance(n_op, O.Dense) and _varies_only_along(op.scale, n_op.axis) \
            and _varies_only_along(op.shift, n_op.axis):
        k = n_op.weight.shape[1]
        s, t = _vector(op.scale, n_op.axis, k), _vector(op.shift, n_op.axis, k)
        bias = n_op.weight @ t + (n_op.bias if n_op.bias is not None else 0.0)
        new = O.Dense(n_op.weight * s[None, :], bias, n_op.axis)
    elif isinstance(n_op, O.Conv) and _varies_only_along(op.scale, 1) \
            and _varies_only_along(op.shift, 1):
        c_in = work.shape_of(node.inputs[0])[1]
        s, t = _vector(op.scale, 1, c_in), _vector(op.shift, 1, c_in)
        if np.any(t != 0) and any(n_op.pads):
            return False  # a shift is not constant across zero-padded borders
        g = n_op.groups
        co, cig, kh, kw = n_op.weight.shape
        w5 = n_op.weight.reshape(g, co // g, cig, kh, kw)
        bias_shift = np.einsum("gojhw,gj->go", w5, t.reshape(g, cig)).reshape(co)
        w = (w5 * s.reshape(g, 1, cig, 1, 1)).reshape(co, cig, kh, kw)
        bias = bias_shift + (n_op.bias if n_op.bias is not None else 0.0)
        new = O.Conv(w, bias, n_op.stride, n_op.pads, n_op.dilation, n_op.groups)
    elif isinstance(n_op, O.Scale):
        new = O.Scale(_compress(op.scale * n_op.scale), _compress(op.shift * n_op.scale
                                                                  + n_op.shift))
    else:
        return False
    work.remove(node)
    work.replace(nxt, Node(new, node.inputs, nxt.output, nxt.shape, f"{node.source}+{nxt.source}"))
    return True


def _merge_dense(node: Node, work: _Work) -> bool:
    op = node.op
    if not isinstance(op, O.Dense):
        return False
    prev = work.producer(node.inputs[0])
    if prev is None or not isinstance(prev.op, O.Dense) or prev.op.axis != op.axis \
            or work.sole_use(prev.output) is not node:
        return False
    w1, w2 = prev.op.weight, op.weight
    if w2.shape[0] * w1.shape[1] > w1.size + w2.size:
        return False  # merging would enlarge the layer (a low-rank factorisation)
    b1 = prev.op.bias if prev.op.bias is not None else np.zeros(w1.shape[0])
    bias = w2 @ b1 + (op.bias if op.bias is not None else 0.0)
    merged = O.Dense(w2 @ w1, bias, op.axis)
    work.remove(node)
    work.replace(prev, Node(merged, prev.inputs, node.output, node.shape,
                            f"{prev.source}+{node.source}"))
    return True


def _order_statistics(node: Node, work: _Work) -> bool:
    """Any export form of GroupSort/MaxMin ending at ``node``  ==>  one GroupSort (plus a
    permutation and a Reshape where the output layout needs them); see order_statistics."""
    if not OS.in_region(node.op):
        return False
    users = work.uses(node.output)
    if node.output != work.output and users and all(OS.in_region(u.op) for u in users):
        return False  # not the end of the region
    nodes, sources = OS.region(node, work.producer)
    if not any(isinstance(n.op, (O.Extremum, O.Reduce)) for n in nodes) and not (
            any(isinstance(n.op, O.GroupSort) for n in nodes) and len(nodes) > 1):
        return False  # no order statistics, or a GroupSort already on its own
    if len(sources) != 1:
        return False
    (src,) = sources
    order = [n for n in nodes if isinstance(n.op, OS.ORDER)]
    if len(order) == 1 and isinstance(order[0].op, O.GroupSort) and order[0].inputs == (src,):
        return False  # already canonical: a GroupSort of the source, then layout
    names = ", ".join(n.source for n in order)
    shape = work.shape_of(src)
    if int(np.prod(shape)) > OS.MAX_ELEMENTS:
        work.notes.append(f"node {node.source}: max/min over {int(np.prod(shape))} values is "
                          "not analysed for GroupSort (above the size limit)")
        return False
    try:
        canon = OS.canonical_group_sort(OS.evaluate_terms(nodes, src, shape), shape)
    except OS.NotGroupSort as why:
        work.notes.append(f"nodes {names}: not a GroupSort ({why}); kept as max/min")
        return False
    position = work.position[node.output]
    value = f"{node.output}::groupsort"
    label = f"{'MaxMin' if canon.groups.shape[1] == 2 else 'GroupSort'}({names})"
    work.insert_at(position - 0.5, Node(O.GroupSort(canon.axis, canon.groups), (src,), value,
                                        shape, label))
    if canon.permutation is not None:
        n = shape[canon.axis]
        perm = np.zeros((n, n))
        perm[np.arange(n), canon.permutation] = 1.0
        work.insert_at(position - 0.25, Node(O.Dense(perm, None, canon.axis), (value,),
                                             value + "::order", shape,
                                             f"output order of {label}"))
        value += "::order"
    if canon.negate:  # the region's output is the negated sort (a Neg the next layer took)
        work.insert_at(position - 0.125, Node(O.Scale(np.full(shape, -1.0), np.zeros(shape)),
                                              (value,), value + "::neg", shape,
                                              f"negation of {label}"))
        value += "::neg"
    work.replace(node, Node(O.Reshape(node.shape), (value,), node.output, node.shape,
                            node.source))
    return True


_RULES = (_fold_scale_into_producer, _fold_scale_into_consumer, _merge_dense,
          _order_statistics)


def canonicalize(graph: Graph) -> Graph:
    """Apply the exact rewrites above until none applies."""
    work = _Work(graph)
    for _ in range(10_000):
        changed = False
        for node in work.nodes:
            if not work.alive(node):
                continue
            if _is_identity(node, work):
                before = len(work.by_output)
                work.bypass(node)
                changed = changed or len(work.by_output) != before
                continue
            if any(rule(node, work) for rule in _RULES):
                changed = True
        notes = work.notes
        work = _Work(work.result())  # drop dead nodes, renumber positions
        if not changed:
            break
    return work.result().with_notes(*notes)
