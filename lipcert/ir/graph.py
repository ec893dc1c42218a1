"""The lipcert graph IR: an immutable, topologically ordered DAG of single-output nodes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property

from .ops import Op


@dataclass(frozen=True)
class Node:
    """One op applied to data inputs (value names) producing the value ``output``.

    ``source`` names the ONNX node(s) it came from, for error messages.
    """

    op: Op
    inputs: tuple[str, ...]
    output: str
    shape: tuple[int, ...]
    source: str

    def with_op(self, op: Op, source: str | None = None) -> Node:
        return replace(self, op=op, source=self.source if source is None else source)


@dataclass(frozen=True)
class Graph:
    """A DAG from one input value to one output value.

    ``notes`` records what the importer assumed (e.g. symbolic dims fixed to 1); they travel
    into every Bound computed on this graph.
    """

    input: str
    input_shape: tuple[int, ...]
    output: str
    nodes: tuple[Node, ...]
    notes: tuple[str, ...] = ()
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        known = {self.input}
        for node in self.nodes:
            missing = [i for i in node.inputs if i not in known]
            if missing:
                raise ValueError(f"graph not topologically ordered: {node.output} needs {missing}")
            if node.output in known:
                raise ValueError(f"value {node.output!r} defined twice")
            known.add(node.output)
        if self.output not in known:
            raise ValueError(f"output {self.output!r} is not produced by the graph")

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shape_of(self.output)

    def shape_of(self, value: str) -> tuple[int, ...]:
        if value == self.input:
            return self.input_shape
        return self.producer(value).shape

    def producer(self, value: str) -> Node:
        return self._by_output[value]

    @cached_property
    def _by_output(self) -> dict[str, Node]:
        return {node.output: node for node in self.nodes}

    def consumers(self) -> dict[str, list[Node]]:
        uses: dict[str, list[Node]] = {self.input: []}
        for node in self.nodes:
            uses.setdefault(node.output, [])
            for i in node.inputs:
                uses[i].append(node)
        return uses

    def with_nodes(self, nodes: list[Node] | tuple[Node, ...], output: str | None = None) -> Graph:
        return replace(self, nodes=tuple(nodes), output=self.output if output is None else output)

    def with_notes(self, *notes: str) -> Graph:
        return replace(self, notes=self.notes + tuple(n for n in notes if n not in self.notes))

    def is_chain(self) -> bool:
        """True when every node has one data input, the previous node's output."""
        prev = self.input
        for node in self.nodes:
            if node.inputs != (prev,):
                return False
            prev = node.output
        return prev == self.output

    def parameter_count(self) -> int:
        return sum(int(a.size) for node in self.nodes for a in node.op.parameters().values())
