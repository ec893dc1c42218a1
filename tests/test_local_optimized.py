"""alpha/beta-CROWN pre-activation bounds (local/optimized.py) against sampled truth, plain
CROWN and an exact MIP."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import mlp_graph, random_mlp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lipcert
from lipcert.estimators.local.jacobian import crown_max, forward_bounds
from lipcert.ir import ops as O
from lipcert.ir.lowering import build_affine_dag


def _preactivations(dag, x: torch.Tensor) -> list[torch.Tensor]:
    """z_k at the points x (N, n_0), by the DAG's own affine maps and activations."""
    bases, zs = [x], []
    for k in range(1, dag.n_acts + 1):
        aff = dag.pre[k - 1]
        z = aff.bias + sum(bases[j] @ m.T for j, m in aff.maps.items())
        zs.append(z)
        op = dag.acts[k - 1]
        bases.append(torch.where(z > 0, z, z * (op.alpha if isinstance(op, O.LeakyRelu)
                                                else 0.0)))
    return zs


def _box(n: int, seed: int, eps: float):
    center = np.random.default_rng(seed).uniform(-1, 1, n)
    return (torch.as_tensor(center - eps)[None], torch.as_tensor(center + eps)[None], center)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(3, 12), min_size=2, max_size=3),
       leaky=st.booleans(), seed=st.integers(0, 10_000), n_splits=st.integers(0, 4))
def test_optimised_bounds_hold_on_the_split_domain_and_are_within_crown(widths, leaky, seed,
                                                                         n_splits):
    """Every point of the box whose activation pattern obeys the split constraints has its
    pre-activations inside the optimised bounds."""
    act = O.LeakyRelu(0.1) if leaky else O.Relu()
    graph = random_mlp([4, *widths, 2], act, seed)
    dag = build_affine_dag(graph, "local")
    xl, xu, center = _box(4, seed, 0.6)
    root = forward_bounds(dag, xl, xu)
    # splits on neurons unstable at the root, on the side a random point of the box takes
    gen = np.random.default_rng(seed + 1)
    anchor = torch.as_tensor(center + 0.6 * gen.uniform(-1, 1, 4))[None]
    z_anchor = _preactivations(dag, anchor)
    unstable = [(k, i) for k, r in enumerate(root.relax) for i in
                torch.nonzero(r.mixed[0]).reshape(-1).tolist()]
    chosen = [unstable[i] for i in gen.permutation(len(unstable))[:n_splits]]
    splits = [torch.zeros(1, n, dtype=torch.int8) for n in dag.sizes[1:]]
    for k, i in chosen:
        splits[k][0, i] = 1 if z_anchor[k][0, i] >= 0 else -1
    tuned = forward_bounds(dag, xl, xu, splits, iterations=20)
    points = torch.as_tensor(center + 0.6 * gen.uniform(-1, 1, (4000, 4)))
    points = torch.cat([points, anchor, anchor + 1e-3 * torch.randn(200, 4, dtype=torch.float64)
                        .clamp(-1, 1)]).clamp(xl, xu)
    zs = _preactivations(dag, points)
    keep = torch.ones(points.shape[0], dtype=torch.bool)
    for k, s in enumerate(splits):
        sign = s[0].to(torch.float64)
        keep &= ((zs[k] * sign) >= 0).all(1)
    assert bool(keep.any())
    for k in range(dag.n_acts):
        z = zs[k][keep]
        assert bool((z >= tuned.zl[k][0] - 1e-9).all()), (k, "lower")
        assert bool((z <= tuned.zu[k][0] + 1e-9).all()), (k, "upper")
    for k in range(1, dag.n_acts):
        # a row the optimisation leaves unstable was optimised from CROWN's own start on the
        # same earlier relaxations: it is no looser than that CROWN bound
        rows = torch.nonzero(tuned.relax[k].mixed[0]).reshape(-1)
        if rows.numel():
            up = crown_max(dag, k + 1, 1.0, tuned.relax, xl, xu, rows)
            lo = -crown_max(dag, k + 1, -1.0, tuned.relax, xl, xu, rows)
            assert bool((tuned.zu[k][:, rows] <= up + 1e-9 * (1 + up.abs())).all()), k
            assert bool((tuned.zl[k][:, rows] >= lo - 1e-9 * (1 + lo.abs())).all()), k
    assert not bool(tuned.infeasible.any())  # the anchor's pattern is not empty


def _threshold_net(n_in: int = 6, n_mid: int = 12, seed: int = 0):
    """A net whose second layer depends on x only through s = relu(a x): each of its neurons
    turns on at its own threshold of s, so of their 2^n_mid patterns only n_mid + 1 occur
    (the structure of mnist-net_256x2 on its eps 0.03 box, ../shared/cases)."""
    gen = np.random.default_rng(seed)
    a = gen.uniform(0.5, 1.5, n_in) * gen.choice([-1, 1], n_in)
    w1 = np.vstack([a, -np.abs(gen.uniform(0.1, 1, (2, n_in)))])
    b1 = np.array([0.0, -10.0, -10.0])  # neurons 1 and 2: off on the whole box
    s_max = np.abs(a).sum()
    tau = np.sort(gen.uniform(0.05, 0.95, n_mid)) * s_max
    w2 = np.zeros((n_mid, 3))
    w2[:, 0] = gen.uniform(0.5, 2.0, n_mid) * gen.choice([-1, 1], n_mid)
    b2 = -w2[:, 0] * tau  # z2_i = w_i (s - tau_i)
    w3 = gen.standard_normal((3, n_mid))
    return mlp_graph([w1, w2, w3], [b1, b2, np.zeros(3)], O.Relu())


def test_same_layer_split_settles_the_neurons_it_implies():
    """Splitting one threshold neuron decides all neurons whose thresholds lie on the same
    side: beta on the split's own layer sees it, clamping alone does not."""
    graph = _threshold_net()
    dag = build_affine_dag(graph, "local")
    xl, xu = torch.full((1, 6), -1.0, dtype=torch.float64), torch.ones(1, 6, dtype=torch.float64)
    root = forward_bounds(dag, xl, xu)
    assert int(root.relax[1].mixed.sum()) == 12
    splits = [torch.zeros(1, n, dtype=torch.int8) for n in dag.sizes[1:]]
    splits[0][0, 0] = 1  # s = a x >= 0, so that s is exact
    w = dag.pre[1].maps[1][:, 0]
    middle = 6  # the sixth threshold: s >= tau_6 or s <= tau_6
    splits[1][0, middle] = 1 if float(w[middle]) > 0 else -1  # s >= tau_middle
    plain = forward_bounds(dag, xl, xu, splits)
    tuned = forward_bounds(dag, xl, xu, splits, iterations=20)
    assert int(plain.relax[1].mixed.sum()) == 11
    # s >= tau_6 decides the six neurons of smaller thresholds (the multipliers that do it
    # sit on a kink of the bound: first-order steps find most of them); the five of larger
    # thresholds take both signs on the domain and must stay unstable
    unstable = tuned.relax[1].mixed[0]
    assert bool(unstable[7:].all())
    assert int(unstable[:6].sum()) <= 3


def test_branch_and_bound_with_multipliers_reaches_the_mip_value(monkeypatch):
    from lipcert.estimators.local import bab

    # split domains optimise whatever the first split's timing says (deterministic)
    monkeypatch.setattr(bab, "OPTIMIZE_COST_RATIO", math.inf)
    graph = _threshold_net(seed=3)
    region = {"center": np.zeros(6), "eps": 1.0}
    exact = lipcert.bound(graph, "exact", "inf", time_limit=math.inf, **region)
    assert exact.details["status"] == ["optimal"] * 3
    tuned = lipcert.bound(graph, "local", "inf", bab_time=math.inf, max_domains=3000,
                          optimize_steps=20, **region)
    plain = lipcert.bound(graph, "local", "inf", bab_time=math.inf, max_domains=3000,
                          optimize_steps=0, **region)
    truth = exact.upper
    assert tuned.details["exact"], tuned.notes
    assert tuned.details["exact_arithmetic_bound"] == pytest.approx(truth, rel=1e-6)
    assert plain.details["exact_arithmetic_bound"] >= truth * (1 - 1e-7)
    assert tuned.details["domains"] < plain.details["domains"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(4, 16), min_size=2, max_size=4),
       leaky=st.booleans(), seed=st.integers(0, 10_000), eps=st.sampled_from([0.2, 0.5, 1.0]))
def test_root_slopes_never_loosen_the_bound(widths, leaky, seed, eps):
    """alpha at the root: the optimised local bound is at most plain CROWN's and leaves no
    more neurons unstable (the optimised pass starts from plain CROWN's bounds)."""
    graph = random_mlp([5, *widths, 3], O.LeakyRelu(0.1) if leaky else O.Relu(), seed)
    region = {"center": np.random.default_rng(seed).uniform(-1, 1, 5), "eps": eps}
    plain = lipcert.bound(graph, "local", "inf", bab_time=0, optimize_steps=0, **region)
    tuned = lipcert.bound(graph, "local", "inf", bab_time=0, optimize_steps=20, **region)
    assert tuned.upper <= plain.upper * (1 + 1e-9)
    assert tuned.details["unstable_at_root"] <= plain.details["unstable_at_root"]


def test_dear_optimisation_is_left_to_the_root(monkeypatch):
    """When the first split finds optimised bounds too dear (ratio 0 here), split domains
    get plain CROWN: the search is then the plain one, domain for domain."""
    from lipcert.estimators.local import bab

    monkeypatch.setattr(bab, "OPTIMIZE_COST_RATIO", 0.0)
    graph = _threshold_net(seed=3)
    region = {"center": np.zeros(6), "eps": 1.0}
    runs = [lipcert.bound(graph, "local", "inf", bab_time=math.inf, max_domains=400,
                          optimize_steps=steps, **region) for steps in (20, 0)]
    assert runs[0].details["domains"] == runs[1].details["domains"]
    assert runs[0].upper <= runs[1].upper * (1 + 1e-9)  # root alpha, then the same splits


def test_root_forward_bounds_lie_inside_plain_crowns():
    """A net where optimising the earlier layers alone loosens a later one (CROWN's slope
    choice is not monotone): the root's optimised pass, started from plain CROWN's bounds,
    stays inside them at every layer."""
    from lipcert.estimators.local.bab import LocalProblem

    graph = random_mlp([4, 5, 4, 8, 2], O.LeakyRelu(0.1), 1)
    dag = build_affine_dag(graph, "local")
    xl, xu, _ = _box(4, 1, 0.6)
    plain = forward_bounds(dag, xl, xu)
    alone = forward_bounds(dag, xl, xu, iterations=20)
    assert bool((alone.zu[2] > plain.zu[2] + 1e-6).any())  # the looser later layer
    problem = LocalProblem(dag, xl.numpy(), xu.numpy(), np.eye(2), iterations=20)
    root, _, _ = problem.evaluate([0, 1], None, None)
    for k in range(dag.n_acts):
        assert bool((root.zl[k] >= plain.zl[k]).all()), k
        assert bool((root.zu[k] <= plain.zu[k]).all()), k
