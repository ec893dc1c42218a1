"""Errors a user can act on. Each carries the exit code the CLI uses for it.

Exit codes: 0 ok, 1 a certification gate failed, 2 usage or input error, 3 internal error.
"""

from __future__ import annotations

from dataclasses import dataclass


class LipcertError(Exception):
    """Base class: a message for a person, and an exit code."""

    exit_code = 2


class InputError(LipcertError):
    """The file, data or options given cannot be used (missing, malformed, inconsistent)."""


class ModelRefused(LipcertError):
    """The model is readable but lipcert will not bound it (e.g. onnxruntime disagrees)."""


@dataclass(frozen=True)
class UnsupportedNode:
    """One ONNX node the importer cannot represent, and why."""

    op_type: str
    node_name: str
    reason: str


class UnsupportedOpsError(LipcertError):
    """Every unsupported node of a model, collected in one pass and reported together."""

    def __init__(self, items: list[UnsupportedNode]):
        self.items = items
        by_op: dict[str, list[UnsupportedNode]] = {}
        for item in items:
            by_op.setdefault(item.op_type, []).append(item)
        parts = []
        for op, nodes in sorted(by_op.items()):
            names = ", ".join(repr(n.node_name) for n in nodes[:4])
            more = f" and {len(nodes) - 4} more" if len(nodes) > 4 else ""
            reasons = sorted({n.reason for n in nodes})
            parts.append(f"{op} ({len(nodes)}x: {names}{more}; {'; '.join(reasons)})")
        op_types = ", ".join(sorted(by_op))
        super().__init__(
            f"unsupported ONNX ops [{op_types}]: "
            + " | ".join(parts)
            + ". Run `lipcert methods` for the supported ops."
        )


class MethodNotApplicable(LipcertError):
    """A bounding method cannot handle this graph, norm or size; says which node and why."""


class InternalCheckFailed(LipcertError):
    """A value on the way to a printed number failed a soundness check (NaN, negative, or an
    upper bound below a sampled lower bound). No number is printed; this is a bug in lipcert
    or in a solver it relies on, and should be reported."""

    exit_code = 3


def positive_int_env(name: str, default: int, unit: str) -> int:
    """A positive integer setting read from the environment variable ``name``."""
    import os

    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InputError(f"{name}={raw!r}: expected a number of {unit}") from None
    if value <= 0:
        raise InputError(f"{name}={raw!r}: expected a positive number of {unit}")
    return value
