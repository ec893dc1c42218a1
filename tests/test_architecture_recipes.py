"""docs/ARCHITECTURE.md's two recipes, followed: an ONNX op added through existing IR ops
(HardSigmoid), and a new estimator registered with its own settings and handler table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from helpers import MODELS, export, sampled_gradient_lower

import lipcert
from lipcert.errors import InputError
from lipcert.estimators import base
from lipcert.estimators.base import Bound, Estimator
from lipcert.estimators.settings import setting
from lipcert.ir import ops as O
from lipcert.rounding import mul_up
from lipcert.soundness import checked


def test_recipe_add_an_onnx_op(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Hardsigmoid(),
                              torch.nn.Linear(6, 2))
    path = export(net, torch.zeros(1, 4), tmp_path / "m.onnx")
    assert "HardSigmoid" in {n.op_type for n in onnx.load(path).graph.node}
    graph = lipcert.load(path)  # checked against onnxruntime
    for norm in ("2", "inf"):
        upper = lipcert.bound(graph, "naive", norm).upper
        assert upper >= sampled_gradient_lower(graph, norm, samples=64)
    local = lipcert.bound(graph, "local", "inf", center=np.zeros(4), eps=0.5, bab_time=0)
    assert local.upper is not None and local.upper <= lipcert.bound(graph, "naive",
                                                                     "inf").upper


@dataclass(frozen=True)
class FrobeniusSettings:
    slack: float = setting(1.0, "a factor >= 1 the bound is multiplied by", minimum=1.0)


class FrobeniusEstimator(Estimator):
    """Product of Frobenius norms of dense layers (>= spectral norms): a toy method."""

    name = "frobenius-test"
    summary = "product of Frobenius norms (recipe test)"
    norms = ("2",)
    settings = FrobeniusSettings
    handlers = {O.Dense: "dense", O.Relu: "act", O.Reshape: "one", O.Scale: "scale"}

    def compute(self, graph, norm: str, **options: Any) -> Bound:
        value = float(options["slack"])
        for node in graph.nodes:
            kind = self.handler(node)
            if kind == "dense":
                factor = np.linalg.norm(node.op.weight) * (1 + 1e-12)
            elif kind == "scale":
                factor = float(np.max(np.abs(node.op.scale)))
            else:
                factor = 1.0
            value = mul_up(value, checked(factor, f"factor of {node.source}"))
        return Bound(method=self.name, norm=norm, upper=value)


@pytest.fixture
def registered():
    base.register(FrobeniusEstimator)
    yield
    base.REGISTRY.pop(FrobeniusEstimator.name)


def test_recipe_add_an_estimator(registered):
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    result = lipcert.bound(graph, "frobenius-test", "2")
    assert result.upper >= lipcert.bound(graph, "naive", "2").upper  # ||W||_F >= ||W||_2
    assert "self_check" in result.details and result.details["float32_margin"] > 1
    with pytest.raises(InputError, match="slack"):
        lipcert.bound(graph, "frobenius-test", "2", slack=0.5)
    cnn = lipcert.load(MODELS / "digits_cnn.onnx")
    refused = lipcert.bound(cnn, "frobenius-test", "2")
    assert refused.upper is None and "does not support op Conv" in refused.notes[-1]
