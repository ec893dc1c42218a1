"""Presentation only: rich tables for people, JSON for machines. No computation here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import InputError
from .estimators.base import Bound
from .ir.graph import Graph
from .outputs import write_text


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
        write_text(target, text + "\n", "--json")


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


def certify_table(graph: Graph, cert, summary: dict[str, Any], gate: float | None) -> Table:
    title = (f"lipcert certify: {Path(str(graph.meta.get('path', 'model'))).name} "
             f"(l{cert.norm}, {cert.method}, eps={cert.eps:g})")
    table = Table(title=title)
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("samples", str(summary["samples"]))
    table.add_row("clean accuracy", f"{summary['clean_accuracy']:.2%}")
    for eps, acc in summary["certified_accuracy_at"].items():
        mark = " ◀" if float(eps) == cert.eps else ""
        table.add_row(f"certified accuracy @ {eps}{mark}", f"{acc:.2%}")
    for q, r in summary["radius_percentiles"].items():
        table.add_row(f"certified radius {q}", fmt(r, 4))
    finite = cert.pair_bounds[np.isfinite(cert.pair_bounds) & (cert.pair_bounds > 0)]
    if finite.size:
        table.add_row("logit-difference bounds L_yj", f"{fmt(finite.min(), 4)} .. "
                                                      f"{fmt(finite.max(), 4)}")
    if gate is not None:
        ok = summary["certified_accuracy"] >= gate
        table.add_row("gate", f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}"
                              f"[/]: {summary['certified_accuracy']:.2%} "
                              f"{'>=' if ok else '<'} {gate:.2%}")
    return table


def certify_payload(graph: Graph, cert, summary: dict[str, Any], gate: float | None,
                    per_sample: bool = True) -> dict[str, Any]:
    payload = {
        "lipcert_version": __version__, "model": model_info(graph),
        "method": cert.method, "norm": cert.norm, "eps": cert.eps,
        "summary": summary, "notes": cert.notes,
        "gate": None if gate is None else {
            "min_certified_accuracy": gate,
            "passed": summary["certified_accuracy"] >= gate},
        "pair_bounds": cert.pair_bounds.tolist(),
    }
    if per_sample:
        payload["samples"] = [
            {"index": i, "label": int(cert.labels[i]), "prediction": int(cert.predictions[i]),
             "margin": float(cert.margins[i]), "radius": float(cert.radii[i]),
             "certified": bool(cert.certified(cert.eps)[i])}
            for i in range(len(cert.labels))]
    return payload


def write_junit(path: str, graph: Graph, cert, summary: dict[str, Any], gate: float | None,
                per_sample: bool) -> None:
    """JUnit XML: one test case for the gate (and optionally one per sample)."""
    import xml.etree.ElementTree as ET

    name = Path(str(graph.meta.get("path", "model"))).name
    suite = ET.Element("testsuite", name=f"lipcert certify {name}")
    cases = 0
    failures = 0
    if gate is not None:
        case = ET.SubElement(suite, "testcase", classname=f"lipcert.{name}",
                             name=f"certified accuracy l{cert.norm} eps={cert.eps:g} >= {gate:g}")
        cases += 1
        if summary["certified_accuracy"] < gate:
            failures += 1
            ET.SubElement(case, "failure", message=(
                f"certified accuracy {summary['certified_accuracy']:.4f} < {gate:.4f}"))
    if per_sample:
        certified = cert.certified(cert.eps)
        for i in range(len(cert.labels)):
            case = ET.SubElement(suite, "testcase", classname=f"lipcert.{name}.samples",
                                 name=f"sample {i}")
            cases += 1
            if not certified[i]:
                ET.SubElement(case, "skipped", message=(
                    f"not certified at eps={cert.eps:g}: radius {cert.radii[i]:.4g}, "
                    f"label {cert.labels[i]}, prediction {cert.predictions[i]}"))
    suite.set("tests", str(cases))
    suite.set("failures", str(failures))
    try:
        ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
    except OSError as exc:
        raise InputError(f"--junit {path}: cannot be written ({exc.strerror or exc})") from None


def compare_table(graph: Graph, rows: list[dict[str, Any]], lower) -> Table:
    path = Path(str(graph.meta.get("path", "model"))).name
    norm = rows[0]["norm"] if rows else lower.norm
    table = Table(title=f"lipcert compare: {path} (l{norm}); lower bound {fmt(lower.lower)}")
    for col, just in (("method", "left"), ("upper bound", "right"), ("lower bound", "right"),
                      ("upper / lower", "left"), ("time", "right"), ("status / notes", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for row in rows:
        style = "bold green" if row["best"] else None
        upper = fmt(row["upper"]) if row["upper"] is not None else "-"
        if not row["sound"] and row["upper"] is not None:
            upper += " (ref)"
        status = _status(row)
        table.add_row(row["method"], upper, fmt(row["lower_bound"]), row["tightness"],
                      f"{row['time_s']:.2f}s", status, style=style)
    return table


def _status(row: dict[str, Any]) -> str:
    if row["upper"] is None:
        return next((n for n in reversed(row["notes"]) if not n.startswith(
            ("symbolic", "import", "includes"))), "no bound")
    parts = ["best" if row["best"] else ("certified" if row["sound"] else "reference")]
    if row.get("scope") not in (None, "global"):
        parts.append(f"scope {row['scope']}")
    return ", ".join(parts)


def compare_markdown(graph: Graph, rows: list[dict[str, Any]], lower) -> str:
    path = Path(str(graph.meta.get("path", "model"))).name
    norm = rows[0]["norm"] if rows else lower.norm
    lines = [f"### lipcert compare: `{path}` (l{norm})", "",
             f"Empirical lower bound: **{fmt(lower.lower)}**", "",
             "| method | upper bound | upper / lower | time | status |",
             "|---|---:|---|---:|---|"]
    for row in rows:
        upper = fmt(row["upper"]) if row["upper"] is not None else "—"
        if row["best"]:
            upper = f"**{upper}**"
        status = _status(row).replace("|", "\\|")
        lines.append(f"| {row['method']} | {upper} | {row['tightness']} | "
                     f"{row['time_s']:.2f} s | {status} |")
    return "\n".join(lines) + "\n"


def compare_plot(graph: Graph, rows: list[dict[str, Any]], lower, path: str) -> None:
    """Bar chart (log scale) of each method's bound against the lower bound."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'lipcert[plot]'") from None
    shown = [r for r in rows if r["upper"] is not None and math.isfinite(r["upper"])]
    fig, ax = plt.subplots(figsize=(1.6 * max(3, len(shown)) + 1, 4))
    names = [r["method"] for r in shown]
    values = [r["upper"] for r in shown]
    colors = ["tab:green" if r["best"] else ("tab:blue" if r["sound"] else "tab:gray")
              for r in shown]
    ax.bar(names, values, color=colors)
    if lower.lower:
        ax.axhline(lower.lower, color="tab:red", linestyle="--",
                   label=f"lower bound {fmt(lower.lower, 4)}")
        ax.legend()
    ax.set_yscale("log")
    ax.set_ylabel(f"Lipschitz bound (l{lower.norm})")
    ax.set_title(f"{Path(str(graph.meta.get('path', 'model'))).name}")
    for i, v in enumerate(values):
        ax.text(i, v, fmt(v, 3), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:  # ValueError: an extension matplotlib cannot write
        raise InputError(f"--plot {path}: cannot be written ({exc})") from None
    finally:
        plt.close(fig)
