"""Soundness suite: random networks built the way the audit built them, every method and norm
against independent lower bounds.

Networks: MLPs and convnets with every supported activation (ReLU, LeakyReLU with any slope,
Sigmoid, Tanh, ELU, Softplus, GELU, SiLU, clamps with one-sided, two-sided and infinite
limits, torch.minimum/maximum with a constant, hardtanh, ReLU6), badly scaled weights
(gains 1e-2 .. 1e2), bottlenecks of width 1, convolutions with random kernel, stride,
padding, dilation and groups, residual blocks, BatchNorm and average/max pooling; exported to
ONNX by torch's exporter (opset 20: GELU is one node). Every bound must be at least the
largest Jacobian norm sampled with autograd (a true lower bound, computed here independently
of lipcert's own ``lower`` method), globally and on boxes for ``local``.

CI runs LIPCERT_SOUNDNESS_EXAMPLES (default 10) networks; a release run uses 500, e.g.
``LIPCERT_SOUNDNESS_EXAMPLES=500 python -m pytest tests/test_soundness_suite.py``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import export
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipcert
from lipcert.ir import evaluate

EXAMPLES = int(os.environ.get("LIPCERT_SOUNDNESS_EXAMPLES", "10"))


class Act(torch.nn.Module):
    def __init__(self, kind: str, rng: np.random.Generator):
        super().__init__()
        self.kind = kind
        self.a, self.b = sorted(rng.uniform(-1, 1, 2))
        self.alpha = float(rng.choice([0.01, 0.3, -0.5, 2.0]))

    def forward(self, x):
        k = self.kind
        fn = {"relu": torch.relu,
              "leaky": lambda v: F.leaky_relu(v, self.alpha),
              "sigmoid": torch.sigmoid, "tanh": torch.tanh,
              "clamp_min": lambda v: torch.clamp(v, min=self.a),
              "clamp_max": lambda v: torch.clamp(v, max=self.b),
              "clamp": lambda v: torch.clamp(v, self.a, self.b),
              "minimum": lambda v: torch.minimum(v, torch.tensor(self.b)),
              "maximum": lambda v: torch.maximum(v, torch.tensor(self.a)),
              "hardtanh": F.hardtanh,
              "elu": lambda v: F.elu(v, abs(self.alpha)),
              "softplus": F.softplus, "gelu": F.gelu, "silu": F.silu}.get(k, F.relu6)
        return fn(x)


ACTS = ("relu", "leaky", "sigmoid", "tanh", "clamp_min", "clamp_max", "clamp", "minimum",
        "maximum", "hardtanh", "relu6", "elu", "softplus", "gelu", "silu")


def _scaled(layer: torch.nn.Module, rng: np.random.Generator) -> torch.nn.Module:
    with torch.no_grad():
        layer.weight.mul_(float(10.0 ** rng.uniform(-2, 2)))
        if layer.bias is not None:
            layer.bias.uniform_(-1, 1)
    return layer


def random_mlp(rng: np.random.Generator) -> tuple[torch.nn.Module, tuple[int, ...]]:
    widths = [int(rng.integers(1, 7))] + [int(rng.choice([1, 2, 5, 9, 12]))
                                          for _ in range(int(rng.integers(1, 4)))]
    widths.append(int(rng.integers(1, 4)))
    layers: list[torch.nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(_scaled(torch.nn.Linear(widths[i], widths[i + 1]), rng))
        if i < len(widths) - 2:
            if rng.uniform() < 0.3:
                bn = torch.nn.BatchNorm1d(widths[i + 1]).eval()
                with torch.no_grad():
                    bn.running_mean.uniform_(-1, 1)
                    bn.running_var.uniform_(0.1, 2)
                    bn.weight.uniform_(-2, 2)
                layers.append(bn)
            layers.append(Act(str(rng.choice(ACTS)), rng))
    return torch.nn.Sequential(*layers), (1, widths[0])


class Residual(torch.nn.Module):
    def __init__(self, body: torch.nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def random_convnet(rng: np.random.Generator) -> tuple[torch.nn.Module, tuple[int, ...]]:
    c_in, side = int(rng.integers(1, 4)), int(rng.integers(5, 9))
    k, s = int(rng.integers(1, 4)), int(rng.integers(1, 3))
    d = int(rng.integers(1, 3)) if k > 1 else 1
    groups = c_in if rng.uniform() < 0.3 else 1
    c_mid = groups * int(rng.integers(1, 4))
    pad = int(rng.integers(0, 3))
    conv = _scaled(torch.nn.Conv2d(c_in, c_mid, k, s, pad, d, groups), rng)
    layers: list[torch.nn.Module] = [conv, Act(str(rng.choice(ACTS)), rng)]
    if rng.uniform() < 0.4:
        body = torch.nn.Sequential(_scaled(torch.nn.Conv2d(c_mid, c_mid, 3, 1, 1), rng),
                                   Act(str(rng.choice(ACTS)), rng))
        layers.append(Residual(body))
    out_side = (side + 2 * pad - d * (k - 1) - 1) // s + 1
    if rng.uniform() < 0.4 and out_side >= 2:  # a 2x2 pool needs two positions
        layers.append(torch.nn.AvgPool2d(2, ceil_mode=False) if rng.uniform() < 0.5
                      else torch.nn.MaxPool2d(2))
    layers.append(torch.nn.Flatten())
    model = torch.nn.Sequential(*layers)
    with torch.no_grad():
        n_flat = model(torch.zeros(1, c_in, side, side)).shape[1]
    model.append(_scaled(torch.nn.Linear(n_flat, int(rng.integers(1, 4))), rng))
    return model, (1, c_in, side, side)


def jacobian_lower(graph, norm: str, points: torch.Tensor) -> float:
    best = 0.0
    for x in points:
        jac = torch.autograd.functional.jacobian(
            lambda v: evaluate.run(graph, v).reshape(-1), x).reshape(-1, x.numel())
        val = float(torch.linalg.matrix_norm(jac, 2) if norm == "2" else jac.abs().sum(1).max())
        if np.isfinite(val):
            best = max(best, val)
    return best


RUNS = [("naive", "2"), ("naive", "inf"), ("gram", "2"), ("lipsdp", "2"), ("local", "inf")]


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(seed=st.integers(0, 2**31 - 1), conv=st.booleans())
def test_every_method_is_at_least_the_sampled_lower_bound(tmp_path_factory, seed, conv):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    module, shape = random_convnet(rng) if conv else random_mlp(rng)
    path = export(module, torch.zeros(shape), tmp_path_factory.mktemp("n") / "m.onnx",
                  opset=20)
    graph = lipcert.load(path)
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.1, 1.0, 3.0], dtype=torch.float64)
    points = torch.randn((24, *shape), generator=gen, dtype=torch.float64) \
        * scales[torch.arange(24) % 3].reshape(-1, *([1] * len(shape)))
    center = rng.uniform(-1, 1, int(np.prod(shape)))
    eps = float(rng.choice([0.05, 0.3, 1.0]))
    for method, norm in RUNS:
        options = {"center": center, "eps": eps, "bab_time": 0} if method == "local" else {}
        if method == "lipsdp":  # small sizes only: the suite is about soundness, not reach
            options.update(max_neurons=64, time_limit=5)
        result = lipcert.bound(graph, method, norm, **options)
        assert not result.internal_error, (method, norm, result.notes[-1])
        if result.upper is None:  # no bound is always sound (refused, or no certificate)
            continue
        if method == "local":
            u = torch.rand((24, *shape), generator=gen, dtype=torch.float64)
            u[::2] = (u[::2] > 0.5).double()
            c = torch.as_tensor(center).reshape(shape)
            lower = jacobian_lower(graph, norm, c - eps + 2 * eps * u)
        else:
            lower = jacobian_lower(graph, norm, points)
        assert result.upper >= lower * (1 - 1e-9), (method, norm, result.upper, lower, seed)


@pytest.mark.parametrize("seed", [0, 1])
def test_generator_covers_infinite_clip_limits(tmp_path, seed):
    """The generator really produces the cases the audit found (a sanity check of the suite)."""
    kinds = set()
    for s in range(40):
        module, _ = random_mlp(np.random.default_rng(1000 * seed + s))
        kinds |= {m.kind for m in module.modules() if isinstance(m, Act)}
    assert {"clamp_min", "clamp_max", "minimum", "maximum"} <= kinds
