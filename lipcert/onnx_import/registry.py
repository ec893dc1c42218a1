"""Registry of ONNX op handlers: one small function per ONNX op type (as in onnx2torch).

A handler reads its node through :class:`ImportContext`, emits IR nodes and binds the node's
outputs; it raises :class:`Unsupported` with a reason for attribute combinations it cannot
represent exactly. Nodes whose inputs are all constants never reach a handler: they are
folded by the ONNX reference evaluator.
"""

from __future__ import annotations

from collections.abc import Callable

from .context import ImportContext

Handler = Callable[[ImportContext], None]
HANDLERS: dict[str, Handler] = {}


def handles(*op_types: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for op_type in op_types:
            if op_type in HANDLERS:
                raise ValueError(f"two handlers for ONNX op {op_type}")
            HANDLERS[op_type] = fn
        return fn

    return register


def supported_op_types() -> list[str]:
    from . import handlers  # noqa: F401  (registers the handlers)

    return sorted(HANDLERS)
