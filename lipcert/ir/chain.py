"""Reading a graph as a chain x -> W_1 -> phi_1 -> ... -> phi_{l-1} -> W_l of dense maps
and elementwise activations, for the methods that need that form (LipSDP, LipMIP).

Dense, Scale and Reshape nodes compose directly. A chain with convolutions, pooling or other
linear layout ops is unrolled into its exact matrices by :mod:`affine_dag` (up to a size
limit, beyond which the method says it does not apply)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MethodNotApplicable
from . import ops as O
from .graph import Graph


@dataclass
class DenseChain:
    weights: list[np.ndarray]  # W_1 .. W_l (float64)
    biases: list[np.ndarray]
    activations: list[O.Op]  # phi_1 .. phi_{l-1}, one elementwise op per hidden layer

    @property
    def hidden_sizes(self) -> list[int]:
        return [w.shape[0] for w in self.weights[:-1]]


def _vector_node(node, method: str) -> None:
    if int(np.prod(node.shape)) != max(node.shape):
        raise MethodNotApplicable(f"method {method} needs vector-shaped layers; node "
                                  f"{node.source!r} has shape {node.shape}")


_DIRECT = (O.Dense, O.Scale, O.Reshape)


def dense_chain(graph: Graph, method: str, allowed: tuple[type, ...],
                max_entries: int | None = None) -> DenseChain:
    """Compose consecutive affine nodes; each allowed activation closes a layer. Other
    linear ops (Conv, pooling, ...) are unrolled into matrices (``max_entries`` limit)."""
    if not graph.is_chain():
        raise MethodNotApplicable(f"method {method} needs a chain of layers (no residual "
                                  "branches)")
    if any(not isinstance(node.op, (*_DIRECT, *allowed)) for node in graph.nodes):
        return _unrolled_chain(graph, method, allowed, max_entries)
    n = int(np.prod(graph.input_shape))
    w, b = np.eye(n), np.zeros(n)
    weights, biases, acts = [], [], []
    for node in graph.nodes:
        op = node.op
        if isinstance(op, O.Reshape):
            _vector_node(node, method)
            continue
        if isinstance(op, O.Dense):
            _vector_node(node, method)
            bias = op.bias if op.bias is not None else 0.0
            w, b = op.weight @ w, op.weight @ b + bias
        elif isinstance(op, O.Scale):
            _vector_node(node, method)
            s = np.broadcast_to(op.scale, node.shape).reshape(-1)
            t = np.broadcast_to(op.shift, node.shape).reshape(-1)
            w, b = s[:, None] * w, s * b + t
        elif isinstance(op, allowed):
            weights.append(w)
            biases.append(b)
            acts.append(op)
            w, b = np.eye(w.shape[0]), np.zeros(w.shape[0])
        else:
            names = ", ".join(sorted(a.__name__ for a in allowed))
            raise MethodNotApplicable(f"method {method} does not support op {op.kind} at node "
                                      f"{node.source!r} (chains of Dense and {names})")
    weights.append(w)
    biases.append(b)
    return DenseChain([np.asarray(x, dtype=np.float64) for x in weights],
                      [np.asarray(x, dtype=np.float64) for x in biases], acts)


def _unrolled_chain(graph: Graph, method: str, allowed: tuple[type, ...],
                    max_entries: int | None) -> DenseChain:
    """The chain read from the unrolled affine DAG: z_k may depend only on base k - 1."""
    from .lowering import MAX_ENTRIES, UNROLLABLE, build_affine_dag

    for node in graph.nodes:
        if not isinstance(node.op, allowed) and not isinstance(node.op, UNROLLABLE):
            names = ", ".join(sorted(a.__name__ for a in allowed))
            raise MethodNotApplicable(
                f"method {method} does not support op {node.op.kind} at node "
                f"{node.source!r} (chains of linear layers and {names})")
        if isinstance(node.op, O.ELEMENTWISE_ACTIVATIONS) and not isinstance(node.op, allowed):
            raise MethodNotApplicable(f"method {method} does not support op {node.op.kind} at "
                                      f"node {node.source!r}")
    dag = build_affine_dag(graph, method, MAX_ENTRIES if max_entries is None
                           else int(max_entries))
    weights, biases = [], []
    for k, affine in enumerate([*dag.pre, dag.out]):
        if set(affine.maps) - {k}:  # e.g. a skip path that the chain test did not see
            raise MethodNotApplicable(f"method {method} needs a chain of layers; layer {k + 1} "
                                      "reads an earlier activation")
        m = affine.maps.get(k)
        weights.append(np.zeros((affine.bias.numel(), dag.sizes[k])) if m is None
                       else m.numpy().astype(np.float64))
        biases.append(affine.bias.numpy().astype(np.float64))
    return DenseChain(weights, biases, list(dag.acts))
