"""Presentation only: rich tables for people, JSON for machines. No computation here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import InputError
from .estimators.base import Bound
from .ir.graph import Graph
from .outputs import write_text
from .tables import Column, FoldingTable


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


def bounds_table(graph: Graph, bounds: list[Bound]) -> FoldingTable:
    path = graph.meta.get("path", "model")
    table = FoldingTable(f"lipcert bound: {path}", [
        Column("model"), Column("norm"), Column("method"), Column("bound", "right"),
        Column("time", "right"), Column("notes", fold=True)])
    for b in bounds:
        value = fmt(b.upper) if b.upper is not None else (
            f"≥ {fmt(b.lower)}" if b.lower is not None else "[red]none[/red]")
        table.add_row(Path(str(path)).name, f"l{b.norm}", b.method, value, f"{b.time_s:.2f}s",
                      escape("\n".join(b.notes)))
    return table


def print_table(table, to_stderr: bool = False) -> None:
    Console(stderr=to_stderr, soft_wrap=False).print(table)


def inspect_table(graph: Graph) -> FoldingTable:
    table = FoldingTable(
        f"{graph.meta.get('path', 'model')}: {len(graph.nodes)} IR nodes, "
        f"{graph.parameter_count():,} parameters",
        [Column("#", "right"), Column("op"), Column("inputs"), Column("output shape"),
         Column("params", "right"), Column("from ONNX node(s)", fold=True),
         Column("attributes", fold=True)])
    table.add_row("", "input", "", str(graph.input_shape), "", escape(graph.input), "")
    for k, node in enumerate(graph.nodes, 1):
        params = sum(a.size for a in node.op.parameters().values())
        table.add_row(str(k), node.op.kind, escape(", ".join(node.inputs)), str(node.shape),
                      f"{params:,}" if params else "", escape(node.source),
                      escape(node.op.describe()))
    return table


def certify_table(graph: Graph, cert, summary: dict[str, Any],
                  gate: float | None) -> FoldingTable:
    title = (f"lipcert certify: {Path(str(graph.meta.get('path', 'model'))).name} "
             f"(l{cert.norm}, {cert.method}, eps={cert.eps:g})")
    table = FoldingTable(title, [Column("quantity"), Column("value", "right")],
                         caption=escape("\n".join(f"note: {n}" for n in cert.notes))
                         if cert.notes else None)
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
        "shells": cert.shells, "summary": summary, "notes": cert.notes,
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


def _lower_title(best) -> str:
    return ("no lower bound" if best is None else
            f"best lower bound {fmt(best.value)} ({best.source})")


def compare_table(graph: Graph, rows: list[dict[str, Any]], lower: Bound, best) -> FoldingTable:
    """One row per method, then the sampled yardstick with its time; the tightness of each
    bound is against the largest lower value that applies to it (see ``lower_bound_source``)."""
    path = Path(str(graph.meta.get("path", "model"))).name
    table = FoldingTable(f"lipcert compare: {path} (l{lower.norm}); {_lower_title(best)}", [
        Column("method"), Column("upper bound", "right"), Column("lower bound", "right"),
        Column("upper / lower"), Column("time", "right"),
        Column("status / notes", fold=True)])
    for row in rows:
        upper = fmt(row["upper"]) if row["upper"] is not None else "-"
        if not row["sound"] and row["upper"] is not None:
            upper += " (ref)"
        table.add_row(row["method"], upper, fmt(row["lower_bound"]), row["tightness"],
                      f"{row['time_s']:.2f}s", escape(_status(row)),
                      style="bold green" if row["best"] else None)
    table.add_row("lower", "-", fmt(lower.lower), "-", f"{lower.time_s:.2f}s",
                  escape(_lower_status(lower)), style="dim")
    return table


def _lower_status(lower: Bound) -> str:
    if lower.lower is None:
        return next(iter(reversed(lower.notes)), "no value")
    return (f"sampled {lower.scope} lower bound ({lower.details.get('samples', '?')} starting "
            "points): the yardstick, not a bound")


def _status(row: dict[str, Any]) -> str:
    if row["upper"] is None:
        return next((n for n in reversed(row["notes"]) if not n.startswith(
            ("symbolic", "import", "includes"))), "no bound")
    parts = ["best" if row["best"] else ("certified" if row["sound"] else "reference")]
    if row.get("scope") not in (None, "global"):
        parts.append(f"scope {row['scope']}")
    source = row.get("lower_bound_source")
    if source:
        parts.append("ratio to " + ("the sampled lower bound" if source == "sampled"
                                    else source))
    return ", ".join(parts)


def compare_markdown(graph: Graph, rows: list[dict[str, Any]], lower: Bound, best) -> str:
    path = Path(str(graph.meta.get("path", "model"))).name
    lines = [f"### lipcert compare: `{path}` (l{lower.norm})", "",
             f"{_lower_title(best).capitalize()}; sampled lower bound {fmt(lower.lower)} "
             f"in {lower.time_s:.2f} s.", "",
             "| method | upper bound | lower bound | upper / lower | time | status |",
             "|---|---:|---:|---|---:|---|"]
    for row in rows:
        upper = fmt(row["upper"]) if row["upper"] is not None else "—"
        if row["best"]:
            upper = f"**{upper}**"
        status = _status(row).replace("|", "\\|")
        lines.append(f"| {row['method']} | {upper} | {fmt(row['lower_bound'])} | "
                     f"{row['tightness']} | {row['time_s']:.2f} s | {status} |")
    return "\n".join(lines) + "\n"


def _missing_reason(row: dict[str, Any]) -> str:
    details = row.get("details") or {}
    if details.get("timed_out"):
        return "timed out"
    if details.get("not_applicable"):
        return "not applicable"
    if details.get("error") or details.get("internal_error"):
        return "failed"
    return "no bound"


def _plain(value: float) -> str:
    """A number as people read it on an axis: 1,921 rather than 1.92e+03 (below a million)."""
    if 100 <= abs(value) < 1e6:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def compare_plot(graph: Graph, rows: list[dict[str, Any]], lower: Bound, best,
                 path: str) -> None:
    """Bars of every method's bound from one shared baseline (log scale, whole decades, so
    the heights compare honestly), the best lower bound as a line, a legend for every colour,
    and a labelled mark for each method that gave no bound."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter, LogLocator
    except ImportError:
        raise InputError("--plot needs matplotlib: pip install 'lipcert[plot]'") from None
    values = [r["upper"] if r["upper"] is not None and math.isfinite(r["upper"]) else None
              for r in rows]
    numbers = [v for v in values if v is not None and v > 0]
    if best is not None:
        numbers.append(best.value)
    low = 10.0 ** math.floor(math.log10(min(numbers))) if numbers else 0.1
    high = 10.0 ** math.ceil(math.log10(max(numbers) * 1.5)) if numbers else 10.0
    if high <= low * 10:
        high = low * 100
    fig, ax = plt.subplots(figsize=(1.6 * max(3, len(rows)) + 1.5, 4.5))
    colour = {"best": "tab:green", "certified": "tab:blue", "reference": "tab:gray"}
    kinds: set[str] = set()
    for i, (row, v) in enumerate(zip(rows, values, strict=True)):
        if v is None or v <= 0:
            ax.plot(i, low * 1.3, marker="x", color="tab:red", markersize=10)
            ax.text(i, low * 1.6, _missing_reason(row), ha="center", va="bottom", fontsize=8,
                    color="tab:red", rotation=90)
            continue
        kind = "best" if row["best"] else ("certified" if row["sound"] else "reference")
        ax.bar(i, v - low, bottom=low, color=colour[kind])
        ax.text(i, v, _plain(v), ha="center", va="bottom", fontsize=8)
        kinds.add(kind)
    handles = [Patch(color=c, label=f"{k} upper bound" if k != "reference"
                     else "reference value (not a certificate)")
               for k, c in colour.items() if k in kinds]
    if best is not None:
        handles.append(ax.axhline(best.value, color="tab:red", linestyle="--",
                                  label=f"lower bound {fmt(best.value, 4)} ({best.source})"))
    if any(v is None or v <= 0 for v in values):
        handles.append(ax.plot([], [], "x", color="tab:red", label="no bound (reason above)")[0])
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
    ax.set_ylabel(f"Lipschitz bound (l{lower.norm}), log scale from {low:g}")
    ax.set_title(f"{Path(str(graph.meta.get('path', 'model'))).name}")
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:  # ValueError: an extension matplotlib cannot write
        raise InputError(f"--plot {path}: cannot be written ({exc})") from None
    finally:
        plt.close(fig)
