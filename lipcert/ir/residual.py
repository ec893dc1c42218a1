"""Reading a residual graph as parts whose Lipschitz constants multiply.

A *cut* is a value that every later node reaches only through it: the output of node i
when nothing produced before node i is read after it. Between two cuts lies a *segment*
with one input and one output, unrolled into an :class:`~lipcert.ir.lowering.AffineDag`.
A segment whose activations form a chain, z_k = M_k B_{k-1} (the pre-activation of each
activation reads only the one before it), and whose output reads any of its bases,

    y = sum_k C_k B_k,    B_0 = the segment's input,

is a chain *with output connections*; a residual block y = S x + A sigma(B x + b) is the
case of one activation, with C = [S, A]. Consecutive segments are merged while the earlier
one's output reads only its last base (then the later one's first matrices compose with it
exactly); a segment with a skip closes its part. f is the composition of the parts, so the
product of their Lipschitz constants bounds f.

Each part is returned as weights [M_1, ..., M_K, C]: for a plain chain C is the last
layer's matrix (n_out x n_K), with output connections it is [C_0, C_1, ..., C_K]
(n_out x (n_0 + ... + n_K)), the form LipSDP's assembly reads as "the output map covers
every block of the LMI" (see lipsdp/lmi.py). Used by ``lipsdp``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import MethodNotApplicable
from . import ops as O
from .graph import Graph


@dataclass
class Part:
    """One factor of the product: hidden layers ``hidden`` (M_k, activation k), and the
    output map as {base: C_base} (base 0: the part's input)."""

    n_in: int
    hidden: list[tuple[np.ndarray, O.Op]]
    out: dict[int, np.ndarray]
    sources: list[str]

    @property
    def open(self) -> bool:
        """True when the output reads only the last base (a later part can compose)."""
        return set(self.out) <= {len(self.hidden)}

    @property
    def skip(self) -> bool:
        return not self.open

    def weights(self) -> list[np.ndarray]:
        """[M_1, ..., M_K, C] with C as described in the module docstring."""
        ws = [m for m, _ in self.hidden]
        k_last = len(self.hidden)
        sizes = [self.n_in] + [m.shape[0] for m in ws]
        n_out = next(iter(self.out.values())).shape[0]
        if self.open:
            c = self.out.get(k_last, np.zeros((n_out, sizes[-1])))
        else:
            c = np.hstack([self.out.get(k, np.zeros((n_out, sizes[k])))
                           for k in range(k_last + 1)])
        return [*ws, c]

    @property
    def activations(self) -> list[O.Op]:
        return [a for _, a in self.hidden]


def cut_positions(graph: Graph) -> list[int]:
    """Indices i of the nodes whose output is a cut value (the last node's always is)."""
    last_use: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for value in node.inputs:
            last_use[value] = i
    n = len(graph.nodes)
    cuts, live = [], last_use.get(graph.input, -1)
    for i, node in enumerate(graph.nodes):
        if live <= i:
            cuts.append(i)
        live = max(live, last_use.get(node.output, n))
    return cuts


def _segment_part(graph: Graph, start: int, stop: int, method: str, max_entries: int) -> Part:
    from .lowering import build_affine_dag

    nodes = graph.nodes[start:stop + 1]
    source = graph.input if start == 0 else graph.nodes[start - 1].output
    shape = graph.shape_of(source)
    sub = Graph(source, shape, nodes[-1].output, tuple(nodes))
    dag = build_affine_dag(sub, method, max_entries)
    hidden = []
    for k, affine in enumerate(dag.pre):
        if set(affine.maps) - {k}:
            raise MethodNotApplicable(
                f"method {method} reads residual graphs as blocks y = S x + A sigma(B x + b) "
                f"(skips to the block's output); the activation at node "
                f"{dag.sources[k]!r} reads an earlier activation besides its predecessor")
        m = affine.maps.get(k)
        hidden.append((np.zeros((affine.bias.numel(), dag.sizes[k])) if m is None
                       else m.numpy().astype(np.float64), dag.acts[k]))
    out = {j: m.numpy().astype(np.float64) for j, m in dag.out.maps.items()}
    if not out:  # a constant segment
        out = {len(hidden): np.zeros((dag.out.bias.numel(), dag.sizes[-1]))}
    return Part(dag.sizes[0], hidden, out, list(dag.sources))


def _compose(first: Part, second: Part) -> Part:
    """second after first, where first's output reads only its last base: the input of
    second is first.out[K] B_K, so second's maps from its input compose with it."""
    k_first = len(first.hidden)
    link = first.out[k_first]
    hidden = list(first.hidden)
    for j, (m, act) in enumerate(second.hidden):
        hidden.append((m @ link if j == 0 else m, act))
    out = {}
    for j, c in second.out.items():
        out[k_first + j] = c @ link if j == 0 else c
    return Part(first.n_in, hidden, out, first.sources + second.sources)


def residual_parts(graph: Graph, method: str, max_entries: int) -> list[Part]:
    """The graph as parts whose Lipschitz constants multiply (module docstring)."""
    cuts = cut_positions(graph)
    parts: list[Part] = []
    start = 0
    for stop in cuts:
        part = _segment_part(graph, start, stop, method, max_entries)
        start = stop + 1
        if parts and parts[-1].open:
            parts[-1] = _compose(parts[-1], part)
        else:
            parts.append(part)
    # a linear tail after a closed part folds into it: C <- L C
    merged: list[Part] = []
    for part in parts:
        if merged and merged[-1].skip and not part.hidden:
            prev = merged[-1]
            link = part.out[0]
            merged[-1] = Part(prev.n_in, prev.hidden,
                              {j: link @ c for j, c in prev.out.items()},
                              prev.sources + part.sources)
        else:
            merged.append(part)
    return merged
