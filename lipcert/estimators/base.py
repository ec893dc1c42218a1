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

from ..errors import InputError, InternalCheckFailed, MethodNotApplicable
from ..ir.graph import Graph, Node
from ..rounding import float32_execution_margin, mul_up
from ..soundness import checked
from .common.progress import report, reporting
from .settings import NoSettings, merged_options, parse_settings

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
    #: box-scoped methods given ``queries`` (rows c_q): a certified bound per functional c_q^T f
    per_query: list[float] | None = None

    @property
    def internal_error(self) -> bool:
        """True when a soundness check stopped the method (exit 3 in the CLI)."""
        return bool(self.details.get("internal_error"))

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
    #: the frozen dataclass of the method's settings (names, types, defaults, bounds)
    settings: ClassVar[type] = NoSettings
    #: (setting, share): a setting that makes the method stop by itself, and the share of a
    #: caller's time limit it may take (compare sets it so that a method ends in time)
    deadline: ClassVar[tuple[str, float] | None] = None
    #: settings that differ when the method certifies samples (one run per sample)
    certify_defaults: ClassVar[dict[str, Any]] = {}
    #: True: given ``targets`` (one per query, the bounds a certificate needs) the method
    #: may stop refining once they are met (its bounds stay valid either way)
    takes_targets: ClassVar[bool] = False
    #: True: the method also bounds output functionals from below on a box
    #: (``margin_lower_bounds``), which certification uses as a second certificate
    bounds_margins: ClassVar[bool] = False

    @property
    def accepts_region(self) -> bool:
        """Box-scoped methods bound the region given by center/eps/domain."""
        return self.scope == "box"

    def parse_settings(self, options: dict[str, Any]) -> Any:
        """The method's settings from ``options``; unknown keys and bad values: InputError."""
        return parse_settings(self.name, self.settings, options)

    def default(self, name: str) -> Any:
        return getattr(self.settings(), name)

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


def run_estimator(graph: Graph, method: str = "naive", norm: str = "2", *,
                  self_check: bool = True, **options: Any) -> Bound:
    """Run one method, timing it; a method that does not apply returns upper=None and why.

    Every certified value leaves through here: it must be a number >= 0 (NaN fails), it is
    multiplied by the float32 execution margin, and (unless ``self_check`` is False) it is
    compared with a quick sampled lower bound of the same quantity on the same region. A
    failed check gives upper=None, ``details["internal_error"]`` and the reason in the notes.
    """
    norm = parse_norm(norm)
    estimator = get_estimator(method)
    start = time.perf_counter()
    options = merged_options(estimator.parse_settings(options), options)
    try:
        estimator.check(graph, norm)
        with reporting(options.get("progress")):
            result = estimator.compute(graph, norm, **options)
            if self_check and result.upper is not None:
                report("soundness self-check")
            _finish(graph, estimator, norm, result, options, self_check)
    except MethodNotApplicable as exc:
        result = Bound(method=method, norm=norm, upper=None, sound=estimator.certificate,
                       scope=estimator.scope, notes=[str(exc)])
        result.details["not_applicable"] = True
    except InternalCheckFailed as exc:
        result = Bound(method=method, norm=norm, upper=None, sound=estimator.certificate,
                       scope=estimator.scope, notes=[str(exc)])
        result.details["internal_error"] = True
    result.time_s = time.perf_counter() - start
    result.notes = list(graph.notes) + [n for n in result.notes if n not in graph.notes]
    return result


def _finish(graph: Graph, estimator: Estimator, norm: str, result: Bound, options: dict,
            self_check: bool) -> None:
    """Checks, the execution margin (the one place it is applied) and the self-check."""
    if result.upper is None:
        return
    what = f"the {estimator.name} bound"
    exact = checked(result.upper, what)
    per_query = None if result.per_query is None else [
        checked(v, f"{what} of query {q}") for q, v in enumerate(result.per_query)]
    if not math.isfinite(exact):
        result.upper = math.inf
        return
    if estimator.certificate:  # a reference value (exact) is shown as computed
        margin, n_nodes = execution_margin(graph)
        result.details["exact_arithmetic_bound"] = exact
        result.details["float32_margin"] = margin
        result.upper = mul_up(exact, margin)
        if per_query is not None:
            result.per_query = [mul_up(v, margin) for v in per_query]
        result.notes.append(f"includes a float32 execution margin x{margin:.8f} "
                            f"({n_nodes} weighted ONNX nodes; README: soundness)")
    if not self_check:
        result.notes.append("soundness self-check skipped (--no-self-check)")
        return
    box, queries = None, None
    if estimator.scope == "box":
        from .common.region import box_from_options

        low, high, _ = box_from_options(options, int(math.prod(graph.input_shape)))
        box = (low, high)
        queries = options.get("queries")
    from ..selfcheck import check_upper

    per_item = per_query if queries is not None and per_query is not None else [exact]
    result.details["self_check"] = check_upper(
        graph, estimator.name, norm, per_item, certificate=estimator.certificate, box=box,
        queries=queries if per_item is per_query else None)
