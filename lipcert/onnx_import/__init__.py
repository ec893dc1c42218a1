"""ONNX -> lipcert Graph: read, import every node, canonicalise, check against onnxruntime."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..ir.graph import Graph
from ..ir.passes import canonicalize
from .builder import build_graph
from .fidelity import check_fidelity
from .load import read_model, sha256_of
from .registry import supported_op_types

__all__ = ["load", "supported_op_types"]


def load(path: str | Path, *, verify: bool = True) -> Graph:
    """Import an ONNX model as a canonical Graph.

    With ``verify`` (the default) the canonical graph's float64 forward is compared with
    onnxruntime on random inputs and the model is refused if they disagree.
    """
    model = read_model(path)
    graph = canonicalize(build_graph(model))
    meta = dict(graph.meta, path=str(path), sha256=sha256_of(path),
                producer=f"{model.producer_name} {model.producer_version}".strip())
    if verify:
        info = check_fidelity(model, graph)
        meta["fidelity"] = info
        note = (f"import checked against onnxruntime on {info['compared']} of "
                f"{info['samples']} random inputs with finite outputs (max relative "
                f"difference {info['max_rel_error']:.1e})")
    else:
        meta["fidelity"] = None
        note = ("import NOT checked against onnxruntime (--no-verify): the bound is for "
                "lipcert's reading of the model")
    return replace(graph.with_notes(note), meta=meta)
