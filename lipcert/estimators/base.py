"""Estimator protocol, the Bound result, and the registry of methods.

Each estimator owns a table from IR op class to handler (as in jax_verify); an op missing
from that table makes the method refuse the graph by naming the node, never skip it.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from ..errors import InputError, MethodNotApplicable
from ..ir.graph import Graph, Node
from .rounding import float32_execution_margin, mul_up

NORMS = ("2", "inf")


def parse_norm(norm: str | int | float) -> str:
    text = str(norm).strip().lower().lstrip("l")
    if text in ("2", "2.0"):
        return "2"
    if text in ("inf", "infinity", "oo"):
        return "inf"
    raise InputError(f"unknown norm {norm!r}: use 2 (l2 -> l2) or inf (linf -> linf)")


@dataclass
class Bound:
    """The result of one method on one model.

    ``upper`` is a certified upper bound on the Lipschitz constant (None when the method did
    not produce one; ``notes`` say why). ``sound`` is False only for estimates that are not
    certificates (e.g. the empirical lower bound, whose value is in ``lower``).
    """

    method: str
    norm: str
    upper: float | None
    sound: bool = True
    scope: str = "global"
    lower: float | None = None
    time_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    region: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["norm"] = self.norm
        return data


class Estimator:
    """Base class. Subclasses set ``name``, ``summary``, ``norms`` and ``handlers``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    norms: ClassVar[tuple[str, ...]] = NORMS
    scope: ClassVar[str] = "global"
    certificate: ClassVar[bool] = True  # False: the value is an estimate, not a bound
    handlers: ClassVar[dict[type, Any]] = {}

    def supported_ops(self) -> list[str]:
        return sorted(op.__name__ for op in self.handlers)

    def check(self, graph: Graph, norm: str) -> None:
        if norm not in self.norms:
            raise MethodNotApplicable(
                f"method {self.name} does not support norm {norm} (it supports "
                f"{', '.join(self.norms)})")
        for node in graph.nodes:
            self.handler(node)

    def handler(self, node: Node):
        try:
            return self.handlers[type(node.op)]
        except KeyError:
            raise MethodNotApplicable(
                f"method {self.name} does not support op {node.op.kind} at node "
                f"{node.source!r}; supported: {', '.join(self.supported_ops())}") from None

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:  # pragma: no cover
        raise NotImplementedError


_FACTORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def cached_factor(op: Any, key: tuple, compute):
    """Memoise a per-layer result on the op object (ops are immutable): certification bounds
    many graphs that share all but their last layer."""
    per_op = _FACTORS.setdefault(op, {})
    if key not in per_op:
        per_op[key] = compute()
    return per_op[key]


def options_key(options: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def weighted_onnx_nodes(graph: Graph) -> int:
    """ONNX nodes that carry weights or were folded into a weighted IR node."""
    return sum(len(node.source.split("+")) for node in graph.nodes if node.op.arrays())


def execution_margin(graph: Graph) -> tuple[float, int]:
    """The float32 execution margin every certified bound of ``graph`` is multiplied by,
    and the number of weighted ONNX nodes it counts (README: soundness)."""
    n_nodes = weighted_onnx_nodes(graph)
    return float32_execution_margin(n_nodes), n_nodes


REGISTRY: dict[str, Estimator] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    REGISTRY[cls.name] = cls()
    return cls


def get_estimator(name: str) -> Estimator:
    from . import load_all

    load_all()
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown method {name!r}; available: "
                         f"{', '.join(sorted(REGISTRY))}") from None


def run_estimator(graph: Graph, method: str = "naive", norm: str = "2",
                  **options: Any) -> Bound:
    """Run one method, timing it; a method that does not apply returns upper=None and why."""
    norm = parse_norm(norm)
    estimator = get_estimator(method)
    start = time.perf_counter()
    try:
        estimator.check(graph, norm)
        result = estimator.compute(graph, norm, **options)
    except MethodNotApplicable as exc:
        result = Bound(method=method, norm=norm, upper=None, sound=estimator.certificate,
                       scope=estimator.scope, notes=[str(exc)])
        result.details["not_applicable"] = True
    if result.upper is not None and estimator.certificate and math.isfinite(result.upper):
        margin, n_nodes = execution_margin(graph)
        result.details["exact_arithmetic_bound"] = result.upper
        result.details["float32_margin"] = margin
        result.upper = mul_up(result.upper, margin)
        result.notes.append(f"includes a float32 execution margin x{margin:.8f} "
                            f"({n_nodes} weighted ONNX nodes; README: soundness)")
    result.time_s = time.perf_counter() - start
    result.notes = list(graph.notes) + [n for n in result.notes if n not in graph.notes]
    return result
