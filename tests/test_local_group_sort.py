"""``local`` on GroupSort/MaxMin: the sorting network of ReLU compare-exchanges is the same
function (checked against the IR's own sort), its bounds are sound against sampled gradients
on boxes, branch-and-bound closes the gap on small nets, and no bound exceeds naive."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from helpers import MODELS, random_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_local import box_gradient_lower, check_growing_boxes, exact_bound

import lipcert
from lipcert.ir import evaluate
from lipcert.ir import ops as O
from lipcert.ir.lowering import build_affine_dag
from lipcert.ir.sorting_networks import comparator_stages, expand_group_sorts

DIGITS = MODELS / "digits_test.npz"


def group_sort(g: int, n: int) -> O.GroupSort:
    return O.GroupSort(1, np.arange(n).reshape(n // g, g))


@pytest.mark.parametrize("g", range(1, 13))
def test_comparator_stages_sort_every_zero_one_input(g):
    # the 0-1 principle (Knuth, TAOCP 5.3.4): a comparator network that sorts every 0/1
    # input sorts every input
    stages = comparator_stages(g)
    for stage in stages:
        touched = [i for pair in stage for i in pair]
        assert len(touched) == len(set(touched))  # a stage's pairs are disjoint
    for bits in itertools.product([0, 1], repeat=g):
        v = list(bits)
        for stage in stages:
            for i, j in stage:
                v[i], v[j] = max(v[i], v[j]), min(v[i], v[j])
        assert v == sorted(bits, reverse=True)


@pytest.mark.parametrize("name", ["digits_maxmin", "digits_lip"])
def test_expanded_network_is_the_same_function(name):
    graph = lipcert.load(MODELS / f"{name}.onnx")
    dag = build_affine_dag(graph, "local")
    expanded = expand_group_sorts(dag)
    assert any(isinstance(op, O.GroupSort) for op in dag.acts)
    assert all(isinstance(op, O.Relu) for op in expanded.acts)
    x = torch.as_tensor(np.load(DIGITS)["x"][:20].reshape(20, -1), dtype=torch.float64)
    want = torch.cat([evaluate.run(graph, row.reshape(graph.input_shape)).reshape(1, -1)
                      for row in x])
    np.testing.assert_allclose(expanded.forward(x)[1], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["digits_maxmin", "digits_lip"])
def test_eps_zero_equals_autograd(name):
    graph = lipcert.load(MODELS / f"{name}.onnx")
    x0 = np.load(DIGITS)["x"][3].reshape(-1)
    x = torch.as_tensor(x0, dtype=torch.float64).reshape(graph.input_shape)
    jac = torch.autograd.functional.jacobian(
        lambda v: evaluate.run(graph, v).reshape(-1), x).reshape(10, -1)
    result = lipcert.bound(graph, "local", "inf", center=x0, eps=0.0, bab_time=0)
    assert exact_bound(result) == pytest.approx(float(jac.abs().sum(1).max()), rel=1e-9)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=st.sampled_from([2, 3, 4]), groups=st.integers(1, 3), depth=st.integers(1, 2),
       seed=st.integers(0, 10_000))
def test_random_group_sort_nets_sound_monotone_and_below_naive(g, groups, depth, seed):
    width = g * groups
    graph = random_mlp([3, *[width] * depth, 2], group_sort(g, width), seed)
    center = np.random.default_rng(seed).uniform(-1, 1, 3)
    check_growing_boxes(graph, "inf", center, (0.0, 0.05, 0.3, 1.0), 40, 60, 300)


@pytest.mark.parametrize("g,seed,eps", [(2, 0, 0.5), (4, 1, 0.25), (3, 2, 0.5)])
def test_branching_on_pair_order_reaches_the_local_constant(g, seed, eps):
    # on a 2-input net a fine grid of gradients finds the local constant (every linear
    # piece of positive area is hit); branch-and-bound must close its gap onto it
    graph = random_mlp([2, 2 * g, 2 * g, 2], group_sort(g, 2 * g), seed)
    center = np.array([0.1, -0.2])
    full = lipcert.bound(graph, "local", "inf", center=center, eps=eps, bab_time=math.inf,
                         max_domains=50_000)
    assert full.details["exact"], full.notes
    grid = np.stack(np.meshgrid(*[np.linspace(-eps, eps, 161)] * 2), -1).reshape(-1, 2)
    x = torch.as_tensor(center + grid, dtype=torch.float64).requires_grad_(True)
    out = evaluate.run(graph, x)
    jac = torch.stack([torch.autograd.grad(out[:, j].sum(), x, retain_graph=True)[0]
                       for j in range(2)], 1)
    sampled = float(jac.abs().sum(-1).max())
    assert sampled * (1 - 1e-9) <= exact_bound(full) <= sampled * 1.02
    root = lipcert.bound(graph, "local", "inf", center=center, eps=eps, bab_time=0)
    assert full.upper <= root.upper


def test_cap_keeps_full_sort_below_naive():
    # a full sort of 6 values is a 6-stage sorting network: its chain-rule relaxation on a
    # wide box is loose, and the box-free interval cap (GroupSort's gain 1) takes over
    graph = random_mlp([3, 6, 6, 2], group_sort(6, 6), 1)
    naive = lipcert.bound(graph, "naive", "inf").upper
    wide = lipcert.bound(graph, "local", "inf", center=np.zeros(3), eps=5.0, bab_time=0)
    assert wide.upper <= naive * (1 + 1e-9)
    assert wide.upper >= box_gradient_lower(graph, np.zeros(3), 5.0, samples=60)


def test_certify_local_on_the_bundled_one_lipschitz_net(tmp_path):
    from click.testing import CliRunner

    from lipcert.cli import cli
    full = np.load(DIGITS)
    data = tmp_path / "d.npz"
    np.savez(data, x=full["x"][:20], y=full["y"][:20])
    result = CliRunner().invoke(cli, ["certify", str(MODELS / "digits_lip.onnx"), "--data",
                                      str(data), "-m", "local", "-n", "inf", "--eps", "0.01",
                                      "-o", "domain=0,1"])
    assert result.exit_code in (0, 1), result.output
    assert "certified accuracy" in result.output
