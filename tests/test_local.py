"""The local estimator against independent truth: an exact MIP, autograd, sampled gradients."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import MODELS, SHARED, needs_shared, random_mlp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import lipcert
from lipcert.cli import cli
from lipcert.ir import evaluate
from lipcert.ir import ops as O
from lipcert.ir.lowering import build_affine_dag

DIGITS = MODELS / "digits_test.npz"


def exact_bound(result) -> float:
    """The bound before the float32 execution margin (which every certified bound gets)."""
    return result.details["exact_arithmetic_bound"]


def check_growing_boxes(graph, norm, center, eps_values, samples, bab_samples, max_domains):
    """local on growing boxes around ``center``: the root bound is monotone in eps, at most
    naive and at least the sampled gradient lower bound; branch-and-bound on the largest
    box is at most the root and still above the lower bound."""
    naive = lipcert.bound(graph, "naive", norm).upper
    previous = 0.0
    for eps in eps_values:
        root = lipcert.bound(graph, "local", norm, center=center, eps=eps, bab_time=0)
        assert root.upper >= previous * (1 - 1e-9), (eps, root.upper, previous)
        assert root.upper <= naive * (1 + 1e-9)
        lower = box_gradient_lower(graph, center, eps, samples=samples, norm=norm)
        assert root.upper >= lower * (1 - 1e-9)
        previous = root.upper
    last = eps_values[-1]
    bab = lipcert.bound(graph, "local", norm, center=center, eps=last, bab_time=math.inf,
                        max_domains=max_domains)
    assert bab.upper <= previous * (1 + 1e-12)
    lower = box_gradient_lower(graph, center, last, samples=bab_samples, norm=norm)
    assert bab.upper >= lower * (1 - 1e-9)


def box_gradient_lower(graph, center, eps, samples=200, seed=0, norm="inf") -> float:
    """max_j ||grad f_j(x)||_1 (``norm`` "2": the Jacobian's operator norm) at random points
    and vertices of the box (autograd)."""
    gen = np.random.default_rng(seed)
    best = 0.0
    for k in range(samples):
        u = gen.uniform(-1, 1, center.size) if k % 2 else gen.choice([-1.0, 1.0], center.size)
        x = torch.as_tensor(center + eps * u, dtype=torch.float64).reshape(graph.input_shape)
        jac = torch.autograd.functional.jacobian(
            lambda v: evaluate.run(graph, v).reshape(-1), x).reshape(-1, center.size)
        value = jac.abs().sum(1).max() if norm == "inf" else torch.linalg.matrix_norm(jac, 2)
        best = max(best, float(value))
    return best


@pytest.mark.parametrize("seed,eps", [(0, 0.3), (1, 0.3), (2, 0.3), (0, 0.5)])
def test_bab_reaches_the_exact_mip_value(seed, eps):
    graph = random_mlp([4, 16, 16, 3], O.Relu(), seed)
    center = np.random.default_rng(100 + seed).uniform(-1, 1, 4)
    region = {"center": center, "eps": eps}
    exact = lipcert.bound(graph, "exact", "inf", time_limit=math.inf, **region)
    assert exact.details["status"] == ["optimal"] * 3
    root = lipcert.bound(graph, "local", "inf", bab_time=0, **region)
    full = lipcert.bound(graph, "local", "inf", bab_time=math.inf, max_domains=200_000,
                         **region)  # deterministic: no wall-clock limit
    assert root.details["unstable_at_root"] >= 10  # the test is not trivial
    assert exact_bound(root) >= exact.upper * (1 - 1e-7)
    assert exact_bound(full) >= exact.upper * (1 - 1e-7)
    assert exact_bound(full) <= exact.upper * 1.05
    assert full.details["exact"], full.notes
    assert full.lower <= exact.upper * (1 + 1e-7)


@pytest.mark.parametrize("name", ["digits_mlp", "digits_cnn", "digits_resnet"])
def test_eps_zero_equals_autograd(name):
    graph = lipcert.load(MODELS / f"{name}.onnx")
    x0 = np.load(DIGITS)["x"][5]
    x = torch.as_tensor(x0, dtype=torch.float64).reshape(graph.input_shape)
    jac = torch.autograd.functional.jacobian(
        lambda v: evaluate.run(graph, v).reshape(-1), x).reshape(10, -1)
    truth = float(jac.abs().sum(1).max())
    result = lipcert.bound(graph, "local", "inf", center=x0.reshape(-1), eps=0.0, bab_time=0)
    assert exact_bound(result) == pytest.approx(truth, rel=1e-9)
    assert result.upper >= truth


@pytest.mark.parametrize("act", [O.Tanh(), O.Sigmoid(), O.LeakyRelu(0.1), O.Clip(-0.5, 0.5),
                                 O.Elu(0.5), O.Softplus(), O.Gelu(), O.Silu()])
def test_eps_zero_equals_autograd_other_activations(act):
    graph = random_mlp([5, 12, 12, 3], act, 4)
    x0 = np.random.default_rng(0).uniform(-1, 1, 5)
    x = torch.as_tensor(x0, dtype=torch.float64).reshape(graph.input_shape)
    jac = torch.autograd.functional.jacobian(
        lambda v: evaluate.run(graph, v).reshape(-1), x).reshape(3, -1)
    result = lipcert.bound(graph, "local", "inf", center=x0, eps=0.0, bab_time=0)
    assert exact_bound(result) == pytest.approx(float(jac.abs().sum(1).max()), rel=1e-9)


ACTS = {"relu": O.Relu(), "leaky": O.LeakyRelu(0.2), "tanh": O.Tanh(), "sigmoid": O.Sigmoid(),
        "clip": O.Clip(0.0, 1.0), "elu": O.Elu(1.5), "softplus": O.Softplus(), "gelu": O.Gelu(),
        "silu": O.Silu()}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(2, 10), min_size=2, max_size=4),
       act=st.sampled_from(sorted(ACTS)), seed=st.integers(0, 10_000))
@example(widths=[2, 2], act="leaky", seed=507)  # inactive LeakyReLU output bounds (fixed bug)
@example(widths=[2, 8, 2, 5], act="leaky", seed=1)
def test_random_nets_monotone_sound_and_below_naive(widths, act, seed):
    graph = random_mlp([3, *widths, 2], ACTS[act], seed)
    center = np.random.default_rng(seed).uniform(-1, 1, 3)
    check_growing_boxes(graph, "inf", center, (0.0, 0.01, 0.1, 0.3, 1.0), 40, 60, 100)


def test_domain_clips_the_box_and_tightens():
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x0 = np.load(DIGITS)["x"][0].reshape(-1)
    free = lipcert.bound(graph, "local", "inf", center=x0, eps=0.1, bab_time=0)
    clipped = lipcert.bound(graph, "local", "inf", center=x0, eps=0.1, domain=(0, 1),
                            bab_time=0)
    assert clipped.upper <= free.upper
    assert "within [0, 1]" in clipped.region["describe"]


def test_residual_conv_net_is_sound_and_branching_helps():
    graph = lipcert.load(MODELS / "digits_resnet.onnx")
    x0 = np.load(DIGITS)["x"][1].reshape(-1)
    root = lipcert.bound(graph, "local", "inf", center=x0, eps=0.02, bab_time=0)
    bab = lipcert.bound(graph, "local", "inf", center=x0, eps=0.02, bab_time=math.inf,
                        max_domains=200)
    naive = lipcert.bound(graph, "naive", "inf").upper
    lower = box_gradient_lower(graph, x0, 0.02, samples=60)
    assert lower <= bab.upper <= root.upper <= naive
    assert bab.lower is not None and bab.lower <= bab.upper


def test_logit_difference_functional_matches_certify_row():
    from lipcert.certify import with_output_row
    from lipcert.estimators.local.estimator import local_bound

    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x0 = np.load(DIGITS)["x"][2].reshape(-1)
    row = np.zeros(10)
    row[3], row[7] = 1.0, -1.0
    direct = local_bound(build_affine_dag(graph, "local"), x0 - 0.05, x0 + 0.05, row,
                         bab_time=0).upper
    merged = lipcert.bound(with_output_row(graph, row), "local", "inf", center=x0, eps=0.05,
                           bab_time=0)
    assert exact_bound(merged) == pytest.approx(direct, rel=1e-9)


def test_refuses_unsupported_ops_by_name():
    graph = random_mlp([4, 6, 3], O.Softmax(axis=1), 0)
    result = lipcert.bound(graph, "local", "inf", center=np.zeros(4), eps=0.1)
    assert result.upper is None
    assert "Softmax" in result.notes[-1] and "'act0'" in result.notes[-1]


def test_cli_bound_local_json(tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(cli, [
        "bound", str(MODELS / "digits_mlp.onnx"), "-m", "local", "-n", "inf",
        "--input", str(DIGITS), "--index", "3", "--eps", "0.02", "--domain", "0,1",
        "-o", "bab_time=inf", "-o", "max_domains=300", "--json", str(out)])
    assert res.exit_code == 0, res.output
    row = json.loads(out.read_text())["results"][0]
    assert row["scope"] == "box" and row["region"]["eps"] == 0.02
    assert row["lower"] <= row["upper"] <= row["details"]["root_bound"] * (1 + 1e-6)
    bad = CliRunner().invoke(cli, ["bound", str(MODELS / "digits_mlp.onnx"), "-m", "local",
                                   "-n", "inf", "--eps", "0.1"])
    assert bad.exit_code == 2 and "--input" in bad.output
    wrong = CliRunner().invoke(cli, ["bound", str(MODELS / "digits_mlp.onnx"), "-m", "local",
                                     "-n", "inf", "--input", str(DIGITS), "--eps", "0.1",
                                     "--domain", "1,0"])
    assert wrong.exit_code == 2


def test_certify_with_local_beats_global_linf():
    from lipcert import certify as C

    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x, y = C.load_data(DIGITS)
    x, y = x[:60], y[:60]
    local = C.certify(graph, x, y, eps=0.01, method="local", norm="inf",
                      options={"domain": (0.0, 1.0)})
    naive = C.certify(graph, x, y, eps=0.01, method="naive", norm="inf")
    assert local.certified_accuracy(0.01) > naive.certified_accuracy(0.01)
    assert local.certified_accuracy(0.01) <= local.clean_accuracy
    assert np.all(local.radii <= 0.01)
    assert local.certified_accuracy(0.02) == 0.0  # beyond the box: nothing is claimed
    # a certified sample's margin exceeds L * eps for every class
    for i in np.flatnonzero(local.certified(0.01)):
        assert local.margins[i] > 0


@needs_shared
def test_mnist_vnncomp_radius():
    graph = lipcert.load(SHARED / "mnist-net_256x2.onnx")
    x0 = (np.random.default_rng(0).uniform(0, 1, 784) > 0.8).astype(np.float64)
    root = lipcert.bound(graph, "local", "inf", center=x0, eps=0.03, domain=(0, 1),
                         bab_time=0)
    bab = lipcert.bound(graph, "local", "inf", center=x0, eps=0.03, domain=(0, 1),
                        bab_time=math.inf, max_domains=300)
    naive = lipcert.bound(graph, "naive", "inf").upper
    assert bab.lower <= bab.upper <= root.upper < naive / 10


@pytest.mark.parametrize("seed", [0, 1])
def test_bab_with_targets_stays_sound_and_stops_when_met_or_out_of_reach(seed):
    """Certification's targets change only where the search works and when it stops: every
    per-query bound stays above the exact MIP value; targets between the exact value and the
    root bound are met, targets below an attained value stop the search as out of reach."""
    from lipcert.estimators.local.estimator import local_bound

    graph = random_mlp([4, 16, 16, 3], O.Relu(), seed)
    center = np.random.default_rng(100 + seed).uniform(-1, 1, 4)
    region = {"center": center, "eps": 0.3}
    exact = lipcert.bound(graph, "exact", "inf", time_limit=math.inf, **region)
    truth = np.array(exact.details["per_output"])
    dag = build_affine_dag(graph, "local")
    low, high = center - 0.3, center + 0.3
    root = np.array(local_bound(dag, low, high, np.eye(3), bab_time=0).per_query)
    assert np.all(root >= truth * (1 - 1e-7)) and np.any(root > truth * 1.01)
    reachable = truth * 1.02 + 1e-9
    met = local_bound(dag, low, high, np.eye(3), bab_time=math.inf, max_domains=200_000,
                      targets=reachable)
    assert met.stopped == "targets met", met.stopped
    got = np.array(met.per_query)
    assert np.all(got >= truth * (1 - 1e-7)) and np.all(got <= np.maximum(reachable, root))
    too_low = truth * 0.5
    out = local_bound(dag, low, high, np.eye(3), bab_time=math.inf, max_domains=200_000,
                      targets=too_low)
    assert out.stopped.startswith("a target is out of reach"), out.stopped
    assert np.all(np.array(out.per_query) >= truth * (1 - 1e-7))
