"""Canonicalising passes: exact rewrites that make graphs small and easy to bound.

- drop identities (same-shape Reshape, full Slice, unit Scale);
- fold elementwise Scale (BatchNorm, input normalisation) into the neighbouring Dense,
  Conv or ConvTranspose, pushing it through Reshape/Transpose first;
- merge consecutive Dense maps and consecutive Scales (exact, and tighter for product
  bounds: ||W2 W1|| <= ||W2|| ||W1||);
- recognise MaxMin written as Concat(Max(a, b), Min(a, b)) of the two halves of a tensor
  (what ``torch.onnx.export`` emits for chunk/maximum/minimum/cat) as a GroupSort;
- remove dead nodes.
Every rewrite is exact; import fidelity is checked on the canonical graph.
"""

from __future__ import annotations

import numpy as np

from . import ops as O
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
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.output = graph.output

    def uses(self, value: str) -> list[Node]:
        return [n for n in self.nodes if value in n.inputs]

    def sole_use(self, value: str) -> Node | None:
        users = self.uses(value)
        if len(users) == 1 and value != self.output:
            return users[0]
        return None

    def shape_of(self, value: str) -> tuple[int, ...]:
        if value == self.graph.input:
            return self.graph.input_shape
        return next(n.shape for n in self.nodes if n.output == value)

    def producer(self, value: str) -> Node | None:
        return next((n for n in self.nodes if n.output == value), None)

    def replace(self, old: Node, new: Node) -> None:
        self.nodes[self.nodes.index(old)] = new

    def bypass(self, node: Node) -> None:
        """Remove a node whose output equals its single input."""
        src = node.inputs[0]
        self.nodes.remove(node)
        self.nodes = [Node(n.op, tuple(src if i == node.output else i for i in n.inputs),
                           n.output, n.shape, n.source) for n in self.nodes]
        if self.output == node.output:
            # keep the output name: re-attach it to the producer of src if any
            prod = self.producer(src)
            if prod is None:
                self.nodes.append(node)  # input is output: keep the identity
                return
            self.output = src

    def result(self) -> Graph:
        live = {self.output}
        kept = []
        for n in reversed(self.nodes):
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
    work.replace(prev, Node(new, prev.inputs, node.output, node.shape,
                            f"{prev.source}+{node.source}"))
    work.nodes.remove(node)
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
        i = work.nodes.index(node)
        work.nodes.remove(node)
        work.nodes.remove(nxt)
        work.nodes[i:i] = [moved_layout, moved_scale]
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
    work.replace(nxt, Node(new, node.inputs, nxt.output, nxt.shape, f"{node.source}+{nxt.source}"))
    work.nodes.remove(node)
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
    work.replace(prev, Node(merged, prev.inputs, node.output, node.shape,
                            f"{prev.source}+{node.source}"))
    work.nodes.remove(node)
    return True


def _max_min(node: Node, work: _Work) -> bool:
    """Concat(Max(x[:h], x[h:]), Min(x[:h], x[h:])) along one axis  ==>  GroupSort pairs."""
    op = node.op
    if not isinstance(op, O.Concat) or len(node.inputs) != 2:
        return False
    first, second = (work.producer(v) for v in node.inputs)
    if not all(isinstance(n, Node) and isinstance(n.op, O.Extremum) for n in (first, second)):
        return False
    if {first.op.mode, second.op.mode} != {"max", "min"} or \
            set(first.inputs) != set(second.inputs) or len(first.inputs) != 2:
        return False
    if any(work.sole_use(n.output) is not node for n in (first, second)):
        return False
    slices = [work.producer(v) for v in first.inputs]
    if not all(isinstance(s, Node) and isinstance(s.op, O.Slice) for s in slices):
        return False
    src = slices[0].inputs[0]
    if slices[1].inputs[0] != src or any(s.op.axis != op.axis or s.op.step != 1 for s in slices):
        return False
    n = work.shape_of(src)[op.axis]
    lo, hi = sorted(slices, key=lambda s: s.op.start)
    h = n // 2
    if n % 2 or (lo.op.start, lo.op.stop, hi.op.start, hi.op.stop) != (0, h, h, n):
        return False
    k = np.arange(h)
    groups = np.stack([k, k + h], 1) if first.op.mode == "max" else np.stack([k + h, k], 1)
    work.replace(node, Node(O.GroupSort(op.axis, groups), (src,), node.output, node.shape,
                            f"MaxMin({first.source}, {second.source})"))
    return True


_RULES = (_fold_scale_into_producer, _fold_scale_into_consumer, _merge_dense, _max_min)


def canonicalize(graph: Graph) -> Graph:
    """Apply the exact rewrites above until none applies."""
    work = _Work(graph)
    for _ in range(10_000):
        changed = False
        for node in list(work.nodes):
            if node not in work.nodes:
                continue
            if _is_identity(node, work):
                before = len(work.nodes)
                work.bypass(node)
                changed = changed or len(work.nodes) != before
                continue
            if any(rule(node, work) for rule in _RULES):
                changed = True
        work.nodes = list(work.result().nodes)
        if not changed:
            break
    return work.result()
