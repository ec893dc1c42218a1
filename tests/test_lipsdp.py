"""LipSDP: certificates are checked; values against independent truth on tiny nets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import export, sampled_gradient_lower
from torch import nn

import lipcert
from lipcert.estimators.lipsdp import certify_multipliers


def _net(weights, act=nn.ReLU):
    layers = []
    for k, w in enumerate(weights):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=True)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(w))
            lin.bias.uniform_(-0.5, 0.5)
        layers.append(lin)
        if k < len(weights) - 1:
            layers.append(act())
    return nn.Sequential(*layers)


def test_two_neuron_counterexample_is_not_undercut(tmp_path):
    """W0 = [[2,-1],[1,-2]], W1 = [[-1,2]]: exact constant sqrt(20); the unsound
    LipSDP-Network coupling returns 3.0."""
    w0, w1 = np.array([[2.0, -1.0], [1.0, -2.0]]), np.array([[-1.0, 2.0]])
    graph = lipcert.load(export(_net([w0, w1]), torch.randn(1, 2), tmp_path / "c.onnx"))
    for form in ("neuron", "layer"):
        result = lipcert.bound(graph, "lipsdp", "2", form=form)
        assert result.upper >= math.sqrt(20.0), result.notes


def test_one_hidden_layer_matches_independent_formulation(tmp_path):
    import cvxpy as cp

    rng = np.random.default_rng(0)
    w0, w1 = rng.standard_normal((6, 3)), rng.standard_normal((2, 6))
    graph = lipcert.load(export(_net([w0, w1]), torch.randn(1, 3), tmp_path / "o.onnx"))
    ours = lipcert.bound(graph, "lipsdp", "2").upper
    # LipSDP-Neuron for one ReLU layer (alpha = 0, beta = 1), written directly
    t, rho = cp.Variable(6, nonneg=True), cp.Variable()
    m = cp.bmat([[-rho * np.eye(3), w0.T @ cp.diag(t)],
                 [cp.diag(t) @ w0, -2 * cp.diag(t) + w1.T @ w1]])
    cp.Problem(cp.Minimize(rho), [m << 0]).solve(solver="SCS", eps_abs=1e-9, eps_rel=1e-9)
    assert ours == pytest.approx(math.sqrt(rho.value), rel=1e-3)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_tiny_nets_sound_and_forms_ordered(tmp_path, act, seed):
    rng = np.random.default_rng(seed)
    weights = [rng.standard_normal((8, 3)), rng.standard_normal((8, 8)),
               rng.standard_normal((2, 8))]
    graph = lipcert.load(export(_net(weights, act), torch.randn(1, 3), tmp_path / "r.onnx"))
    neuron = lipcert.bound(graph, "lipsdp", "2", form="neuron")
    layer = lipcert.bound(graph, "lipsdp", "2", form="layer")
    naive = lipcert.bound(graph, "naive", "2")
    lower = sampled_gradient_lower(graph, "2", samples=64)
    assert lower <= neuron.upper <= layer.upper * (1 + 1e-4)
    assert neuron.upper <= naive.upper * (1 + 1e-6)


def test_bad_multipliers_are_rejected_not_printed():
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((4, 3)), rng.standard_normal((2, 4))]
    slopes = [(0.0, 1.0)]
    rho, why = certify_multipliers(weights, slopes, np.zeros(4))
    assert rho is None and "negative definite" in why
    rho, _ = certify_multipliers(weights, slopes, np.full(4, 5.0))
    # any certified rho bounds the exact constant of every pattern: check one
    d = np.diag([1.0, 0.0, 1.0, 1.0])
    assert rho >= np.linalg.norm(weights[1] @ d @ weights[0], 2) ** 2


def test_large_nets_are_refused_with_a_reason(tmp_path):
    module = nn.Sequential(nn.Linear(4, 100), nn.ReLU(), nn.Linear(100, 2))
    graph = lipcert.load(export(module, torch.randn(1, 4), tmp_path / "l.onnx"))
    result = lipcert.bound(graph, "lipsdp", "2", max_neurons=64)
    assert result.upper is None and "refuses" in result.notes[-1]


@pytest.mark.parametrize("solver", ["clarabel", "scs", "firstorder"])
def test_every_solver_gives_a_checked_bound(tmp_path, solver):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(),
                           nn.Linear(12, 2))
    graph = lipcert.load(export(module, torch.randn(1, 3), tmp_path / "s.onnx"))
    result = lipcert.bound(graph, "lipsdp", "2", solver=solver)
    assert "certified" in result.details["certificate"]
    assert sampled_gradient_lower(graph, "2", samples=64) <= result.upper
    assert result.upper <= lipcert.bound(graph, "naive", "2").upper
