"""Float64 rounding in local's bound propagation, against exact rational arithmetic.

Every interval and linear bound is widened by the DAG's slack times the magnitude of the
terms summed into it (the rows of the ops' composed absolute values, see
docs/ARCHITECTURE.md, "Rounding"), not by a fraction of the result: a sum that cancels
has an error far larger than its value."""

from __future__ import annotations

from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import mlp_graph

import lipcert
from lipcert.errors import MethodNotApplicable
from lipcert.estimators.local.bab import Domain, LocalProblem
from lipcert.estimators.local.jacobian import forward_bounds, gradient_cap
from lipcert.estimators.local.margin import objective_dag
from lipcert.ir import ops as O
from lipcert.ir.graph import Graph, Node
from lipcert.ir.lowering import build_affine_dag, magnitude_op
from lipcert.ir.sorting_networks import expand_group_sorts


def _cancelling_layer(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One neuron w x + b whose terms are of order 1 but whose lower interval bound over
    [xl, xu] is exactly tiny (b cancels the rest up to about 1e-20)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((1, n))
    xl = rng.uniform(0.5, 1.0, n)
    xu = xl + 1e-9
    exact = sum((Fraction(float(wi)) * Fraction(float(lo if wi > 0 else hi))
                 for wi, lo, hi in zip(w[0], xl, xu, strict=True)), Fraction(0))
    b = -float(exact) + 1e-20
    return w, np.array([b]), np.stack([xl, xu])


def _exact_lower(w: np.ndarray, b: np.ndarray, box: np.ndarray) -> Fraction:
    xl, xu = box
    return Fraction(float(b[0])) + sum(
        (Fraction(float(wi)) * Fraction(float(lo if wi > 0 else hi))
         for wi, lo, hi in zip(w[0], xl, xu, strict=True)), Fraction(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_layer_interval_holds_under_cancellation(seed):
    n = 4000
    w, b, box = _cancelling_layer(n, seed)
    graph = mlp_graph([w, np.ones((1, 1))], [b, np.zeros(1)], O.Relu())
    dag = build_affine_dag(graph, "local")
    xl, xu = (torch.as_tensor(v, dtype=torch.float64)[None] for v in box)
    fwd = forward_bounds(dag, xl, xu)
    exact = _exact_lower(w, b, box)
    assert Fraction(float(fwd.zl[0][0, 0])) <= exact
    # the case is adversarial: the float sum misses the exact one by far more than a
    # fraction 1e-12 of the result (what a relative pad would allow) ...
    computed = float(b[0]) + float(torch.as_tensor(box[0])[w[0] > 0] @ torch.as_tensor(
        w[0][w[0] > 0])) + float(torch.as_tensor(box[1])[w[0] <= 0] @ torch.as_tensor(
            w[0][w[0] <= 0]))
    assert abs(Fraction(computed) - exact) > 1e-12 * abs(exact)
    # ... and the pad stays a rounding-sized fraction of the terms' magnitude
    terms = float(np.abs(b).sum() + np.abs(w[0]) @ box[1])
    assert float(exact) - float(fwd.zl[0][0, 0]) < 1e-10 * terms


def test_scales_of_single_ops_are_their_matrices():
    rng = np.random.default_rng(3)
    conv = O.Conv(rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3), (1, 1),
                  (1, 1, 1, 1), (1, 1), 1)
    dense = O.Dense(rng.standard_normal((4, 3 * 5 * 5)), rng.standard_normal(4), 1)
    nodes = (Node(conv, ("x",), "c", (1, 3, 5, 5), "conv"),
             Node(O.Relu(), ("c",), "r", (1, 3, 5, 5), "relu"),
             Node(O.Reshape((1, 75)), ("r",), "f", (1, 75), "flatten"),
             Node(dense, ("f",), "y", (1, 4), "dense"))
    dag = build_affine_dag(Graph("x", (1, 2, 5, 5), "y", nodes), "local")
    for affine in (*dag.pre, dag.out):
        for j, m in affine.maps.items():
            torch.testing.assert_close(affine.row_mag[j], m.abs().sum(1))
            torch.testing.assert_close(affine.col_mag[j], m.abs().sum(0))
        torch.testing.assert_close(affine.bias_mag, affine.bias.abs())


def test_composed_maps_keep_the_magnitude_their_product_cancels():
    """Dense W1 then Dense W2 without an activation: the computed map W2 W1 is zero, but its
    rounding scale is that of |W2| |W1|, and a map computed as zero keeps its scale."""
    w1 = np.array([[1.0], [1.0]])
    w2 = np.array([[1.0, -1.0]])
    nodes = (Node(O.Dense(w1, None, 1), ("x",), "a", (1, 2), "d1"),
             Node(O.Dense(w2, None, 1), ("a",), "z", (1, 1), "d2"),
             Node(O.Relu(), ("z",), "y", (1, 1), "relu"))
    dag = build_affine_dag(Graph("x", (1, 1), "y", nodes), "local")
    z = dag.pre[0]
    assert 0 not in z.maps  # computed as zero
    assert float(z.row_mag[0][0]) == 2.0 and float(z.col_mag[0][0]) == 2.0
    assert dag.depth == 2


def test_derived_dags_keep_scales_that_cover_their_maps():
    rng = np.random.default_rng(4)
    weights = [rng.standard_normal((6, 3)), rng.standard_normal((2, 6))]
    graph = mlp_graph(weights, [rng.standard_normal(6), rng.standard_normal(2)],
                      O.GroupSort(1, np.arange(6).reshape(3, 2)))
    dag = build_affine_dag(graph, "local")
    for derived in (expand_group_sorts(dag), objective_dag(dag, torch.tensor([[1.0, -1.0]],
                                                                             dtype=torch.float64))):
        assert derived.slack > dag.slack
        for affine in (*derived.pre, derived.out):
            for j, m in affine.maps.items():
                assert bool((affine.row_mag[j] >= m.abs().sum(1) * (1 - 1e-12)).all())
                assert bool((affine.col_mag[j] >= m.abs().sum(0) * (1 - 1e-12)).all())
            assert bool((affine.bias_mag >= affine.bias.abs() * (1 - 1e-12)).all())


def test_gradient_cap_covers_a_map_computed_as_zero():
    """The cancelling composition above, with a skip of slope 1 to the output: the cap must
    still bound the exact gradient (here exactly 1 from the skip; W2 W1 = 0 exactly, so the
    cap is 1 plus the scales' slack)."""
    w1 = np.array([[1.0], [1.0]])
    w2 = np.array([[1.0, -1.0]])
    nodes = (Node(O.Dense(w1, None, 1), ("x",), "a", (1, 2), "d1"),
             Node(O.Dense(w2, None, 1), ("a",), "z", (1, 1), "d2"),
             Node(O.Relu(), ("x",), "r", (1, 1), "relu"),
             Node(O.Add((1.0, 1.0)), ("r", "z"), "y", (1, 1), "add"))
    dag = build_affine_dag(Graph("x", (1, 1), "y", nodes), "local")
    cap = float(gradient_cap(dag, torch.ones(1, 1, dtype=torch.float64))[0])
    assert 1.0 <= cap <= 1.0 + 1e-9


def test_magnitude_op_refuses_an_op_it_has_no_rule_for():
    with pytest.raises(MethodNotApplicable, match="Relu"):
        magnitude_op(O.Relu())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_bound_holds_where_rounding_hides_a_sliver(seed):
    """y = z - relu(z), z = w x + b with 4000 inputs and b chosen so that z's exact minimum
    over the box is -1e-13: z < 0 near that vertex, where the gradient is w, so the local
    constant is ||w||_1. A relative pad took the float interval of z (its rounding error is
    ~1e-12 here) for z > 0 and printed ~1e-8 on one of these seeds."""
    n = 4000
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((1, n))
    center, eps = rng.uniform(0.5, 1.0, n), 1e-9
    xl, xu = center - eps, center + eps
    minimum = sum((Fraction(float(wi)) * Fraction(float(lo if wi > 0 else hi))
                   for wi, lo, hi in zip(w[0], xl, xu, strict=True)), Fraction(0))
    b = -float(minimum) - 1e-13
    assert Fraction(b) + minimum < 0
    nodes = (Node(O.Dense(w, np.array([b]), 1), ("x",), "z", (1, 1), "dense"),
             Node(O.Relu(), ("z",), "r", (1, 1), "relu"),
             Node(O.Add((1.0, -1.0)), ("z", "r"), "y", (1, 1), "sub"))
    graph = Graph("x", (1, n), "y", nodes)
    result = lipcert.bound(graph, "local", "inf", center=center, eps=eps, bab_time=0)
    assert result.upper >= float(np.abs(w).sum()) * (1 - 1e-12)


def _two_neuron_problem():
    """z_0 = x, z_1 = x + 0.5 on x in [-1, 1], then relu and their sum."""
    graph = mlp_graph([np.array([[1.0], [1.0]]), np.ones((1, 2))],
                      [np.array([0.0, 0.5]), np.zeros(1)], O.Relu())
    dag = build_affine_dag(graph, "local")
    return LocalProblem(dag, np.array([-1.0]), np.array([1.0]), np.ones((1, 1)))


def _leaf(signs):
    return Domain(0, [torch.tensor(signs, dtype=torch.int8)],
                  [torch.tensor([-1.0, -0.5], dtype=torch.float64)],
                  [torch.tensor([1.0, 1.5], dtype=torch.float64)], 0.0, None)


def test_leaf_lp_prunes_a_pattern_only_with_a_checked_proof(monkeypatch):
    problem = _two_neuron_problem()
    assert problem.leaf_feasible(_leaf([1, -1])) == "empty"  # x >= 0 and x <= -0.5
    assert problem.leaf_feasible(_leaf([1, 1])) == "interior"
    # an LP that claims a negative margin without duals that prove it: kept, not pruned
    import scipy.optimize

    def claims_empty(c, A_ub, b_ub, bounds, method):
        return SimpleNamespace(status=0, x=np.array([0.0, -1.0]),
                               ineqlin=SimpleNamespace(marginals=np.zeros(len(b_ub))))

    monkeypatch.setattr(scipy.optimize, "linprog", claims_empty)
    assert problem.leaf_feasible(_leaf([1, 1])) == "boundary"
    assert problem.leaf_feasible(_leaf([1, -1])) == "boundary"
