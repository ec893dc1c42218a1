"""Shared test helpers: independent truths (unrolled operators, sampled gradient norms)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
SHARED = ROOT.parent / "shared" / "onnx"


def shared_models() -> list[dict]:
    if not (SHARED / "models.json").is_file():
        return []
    return json.loads((SHARED / "models.json").read_text())


needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/onnx is absent")


def export(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int = 17,
           dynamo: bool = False) -> Path:
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), opset_version=opset, dynamo=dynamo,
                          input_names=["x"], output_names=["y"])
    return path


def unrolled(fn, in_shape: tuple[int, ...]) -> np.ndarray:
    """The matrix of a linear map given as a torch function, by pushing the identity basis
    through it (float64)."""
    n = int(np.prod(in_shape))
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *in_shape)
    with torch.no_grad():
        cols = torch.stack([fn(e).reshape(-1) for e in eye], dim=1)
    return cols.numpy()


def exact_l2(matrix: np.ndarray) -> float:
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


def sampled_gradient_lower(graph, norm: str, samples: int = 128, seed: int = 1) -> float:
    """An independent lower bound: max Jacobian norm at random points (autograd)."""
    from lipcert.ir import evaluate

    gen = torch.Generator().manual_seed(seed)
    best = 0.0
    for k in range(samples):
        scale = [0.1, 1.0, 5.0][k % 3]
        x = torch.randn(graph.input_shape, generator=gen, dtype=torch.float64) * scale
        jac = torch.autograd.functional.jacobian(
            lambda v: evaluate.run(graph, v).reshape(-1), x).reshape(-1, x.numel())
        val = (torch.linalg.matrix_norm(jac, 2) if norm == "2"
               else jac.abs().sum(1).max())
        best = max(best, float(val))
    return best


def mlp_graph(weights: list[np.ndarray], biases: list[np.ndarray], act) -> object:
    """A lipcert IR graph (Dense, act, Dense, ...) built directly, without ONNX."""
    from lipcert.ir import ops as O
    from lipcert.ir.graph import Graph, Node

    nodes, prev = [], "x"
    for k, (w, b) in enumerate(zip(weights, biases, strict=True)):
        nodes.append(Node(O.Dense(np.asarray(w, float), np.asarray(b, float), 1), (prev,),
                          f"z{k}", (1, w.shape[0]), f"dense{k}"))
        prev = f"z{k}"
        if k < len(weights) - 1:
            nodes.append(Node(act, (prev,), f"h{k}", (1, w.shape[0]), f"act{k}"))
            prev = f"h{k}"
    return Graph("x", (1, weights[0].shape[1]), prev, tuple(nodes))


def random_mlp(widths: list[int], act, seed: int, bias_scale: float = 0.5):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((widths[i + 1], widths[i])) / np.sqrt(widths[i])
               for i in range(len(widths) - 1)]
    biases = [rng.uniform(-bias_scale, bias_scale, widths[i + 1])
              for i in range(len(widths) - 1)]
    return mlp_graph(weights, biases, act)


def killing_task(payload: dict, i: int) -> list[float]:
    """A certification task for parallel tests: the worker bounding sample ``kill_at`` kills
    itself (SIGKILL) the first time, as a lost machine or the OOM killer would."""
    import os
    import signal

    marker = Path(payload["marker"])
    if i == payload["kill_at"] and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return [float(i), float(i) / 2]
