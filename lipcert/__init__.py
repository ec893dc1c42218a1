"""lipcert: certified Lipschitz bounds for neural networks read from ONNX files.

Python API (mirrors the CLI)::

    import lipcert
    graph = lipcert.load("model.onnx")
    result = lipcert.bound(graph, method="naive", norm="2")
    print(result.upper)
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

__all__ = ["__version__", "load", "bound", "bound_module"]


def load(path, *, verify: bool = True):
    """Import an ONNX model as a canonical lipcert Graph (checked against onnxruntime)."""
    from .onnx_import import load as _load

    return _load(path, verify=verify)


def bound(model, method: str = "naive", norm: str = "2", **options: Any):
    """Bound the Lipschitz constant of a Graph or an ONNX path; returns a Bound."""
    from .estimators import run_estimator

    graph = load(model) if not hasattr(model, "nodes") else model
    return run_estimator(graph, method, norm, **options)


def bound_module(module, example_input, method: str = "naive", norm: str = "2",
                 **options: Any):
    """Export a torch ``nn.Module`` to ONNX (in a temporary folder) and bound it."""
    import tempfile
    import warnings
    from pathlib import Path

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "module.onnx"
        module = module.eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example_input,), str(path), dynamo=False,
                              opset_version=17)
        return bound(load(path), method, norm, **options)
