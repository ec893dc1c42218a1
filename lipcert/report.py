"""Presentation only: rich tables for people, JSON for machines. No computation here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__
from .estimators.base import Bound
from .ir.graph import Graph


def fmt(value: float | None, digits: int = 6) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.{digits}g}"


def model_info(graph: Graph) -> dict[str, Any]:
    return {"path": graph.meta.get("path"), "sha256": graph.meta.get("sha256")}


def bounds_payload(graph: Graph, bounds: list[Bound], **extra: Any) -> dict[str, Any]:
    """The JSON shape every command that reports bounds uses."""
    return {"lipcert_version": __version__, "model": model_info(graph),
            "results": [b.to_json() for b in bounds], **extra}


def _json_default(obj: Any):
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_json(payload: dict[str, Any], target: str) -> None:
    text = json.dumps(_finite(payload), indent=2, default=_json_default)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n")


def bounds_table(graph: Graph, bounds: list[Bound]) -> Table:
    path = graph.meta.get("path", "model")
    table = Table(title=f"lipcert bound: {path}", show_lines=False)
    for col in ("model", "norm", "method", "bound", "time", "notes"):
        table.add_column(col, overflow="fold", justify="right" if col in ("bound", "time")
                         else "left")
    for b in bounds:
        value = fmt(b.upper) if b.upper is not None else (
            f"≥ {fmt(b.lower)}" if b.lower is not None else "[red]none[/red]")
        table.add_row(Path(str(path)).name, f"l{b.norm}", b.method, value, f"{b.time_s:.2f}s",
                      "\n".join(b.notes))
    return table


def print_table(table: Table, to_stderr: bool = False) -> None:
    Console(stderr=to_stderr, soft_wrap=False).print(table)


def inspect_table(graph: Graph) -> Table:
    table = Table(title=f"{graph.meta.get('path', 'model')}: {len(graph.nodes)} IR nodes, "
                        f"{graph.parameter_count():,} parameters")
    for col in ("#", "op", "inputs", "output shape", "params", "from ONNX node(s)", "attributes"):
        table.add_column(col, overflow="fold")
    table.add_row("", "input", "", str(graph.input_shape), "", graph.input, "")
    for k, node in enumerate(graph.nodes, 1):
        params = sum(a.size for a in node.op.arrays().values())
        table.add_row(str(k), node.op.kind, ", ".join(node.inputs), str(node.shape),
                      f"{params:,}" if params else "", node.source, node.op.describe())
    return table
