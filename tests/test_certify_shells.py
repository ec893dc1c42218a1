"""Certified radii from nested boxes (certify's integral certificate) against hand values and
an exact MIP of the smallest margin on the certified box."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import MODELS, mlp_graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipcert import certify as C
from lipcert.cli import cli
from lipcert.errors import InputError, InternalCheckFailed
from lipcert.ir import ops as O


def test_shell_radius_by_hand():
    # F(r) = 1 r on [0, 0.5], then 0.5 + 3 (r - 0.5): reaches 1 at 0.5 + 0.5 / 3
    r = C.shell_radius(np.array([1.0]), np.array([0.5, 1.0]), np.array([[1.0], [3.0]]), 1.0)
    assert r == pytest.approx(0.5 + 0.5 / 3, rel=1e-12) and r < 0.5 + 0.5 / 3
    # one shell: margin / L, rounded down
    r1 = C.shell_radius(np.array([1.0, 2.0]), np.array([1.0]), np.array([[2.0, 1.0]]), 1.0)
    assert r1 == pytest.approx(0.5, rel=1e-12) and r1 < 0.5
    # below every margin on the whole box: the cap (certified at eps)
    assert C.shell_radius(np.array([1.0]), np.array([0.5, 1.0]), np.array([[0.1], [0.2]]),
                          1.0) == 1.0
    # an inner bound above an outer one is replaced by it (the inner box lies inside)
    inner_high = C.shell_radius(np.array([1.0]), np.array([0.5, 1.0]),
                                np.array([[5.0], [1.5]]), 1.0)
    assert inner_high == pytest.approx(1.0 / 1.5, rel=1e-12)
    # the margin reached exactly at an edge: not certified there
    at_edge = C.shell_radius(np.array([0.5]), np.array([0.5, 1.0]), np.array([[1.0], [1.0]]),
                             1.0)
    assert at_edge < 0.5
    # a margin a rounding step of F crosses in a shell with a zero bound: its inner edge
    tiny = C.shell_radius(np.array([5e-324]), np.array([0.5, 1.0]), np.array([[0.0], [0.0]]),
                          1.0)
    assert tiny == 0.0  # F rounded up passes 5e-324 at once; no division by the zero bound
    # zero gradient bounds: nothing decreases, the cap
    assert C.shell_radius(np.array([1.0]), np.array([0.5, 1.0]), np.zeros((2, 1)), 1.0) == 1.0


def test_shell_radius_never_certifies_nan():
    radii, lips = np.array([0.5, 1.0]), np.ones((2, 2))
    assert C.shell_radius(np.array([np.nan, 1.0]), radii, lips, 1.0) == 0.0
    assert C.shell_radius(np.array([np.inf, 1.0]), radii, lips, 1.0) == 0.0
    assert C.shell_radius(np.array([-1.0, 1.0]), radii, lips, 1.0) == 0.0
    with pytest.raises(InternalCheckFailed):
        C.shell_radius(np.array([1.0, 1.0]), radii, np.array([[1.0, np.nan], [1.0, 1.0]]), 1.0)
    with pytest.raises(InternalCheckFailed):
        C.shell_radius(np.array([1.0, 1.0]), radii, np.array([[1.0, 1.0], [-1.0, 1.0]]), 1.0)


def test_held_radius():
    center = np.array([0.0, 0.5, 1.0])
    low, high = np.maximum(center - 0.25, 0.0), np.minimum(center + 0.25, 1.0)
    # the sides clipped at the domain hold every domain point: only 0.5 +- 0.25 counts
    held = C.held_radius(center, low, high, (0.0, 1.0))
    assert 0.25 * (1 - 1e-15) <= held <= 0.25
    # without a domain a clipped side holds nothing beyond the centre
    assert C.held_radius(center, low, high, None) == 0.0


def _hinge_net():
    """logit0 = 1 - 10 relu(x - 0.5), logit1 = 0: margin 1 at x = 0, flat up to x = 0.5,
    then falling with slope 10: the exact certified radius at 0 is 0.6."""
    return mlp_graph([np.array([[1.0]]), np.array([[-10.0], [0.0]])],
                     [np.array([-0.5]), np.array([1.0, 0.0])], O.Relu())


def test_shells_see_the_flat_part_plain_does_not():
    graph = _hinge_net()
    x, y = np.zeros((1, 1)), np.array([0])
    plain = C.certify(graph, x, y, eps=1.0, method="local", norm="inf", shells=1)
    nested = C.certify(graph, x, y, eps=1.0, method="local", norm="inf", shells=4)
    assert plain.radii[0] == pytest.approx(0.1, rel=1e-5)  # margin / L = 1 / 10
    # shells of radius 0.25, 0.5 (the kink at 0.5: its Clarke derivative may count), ...
    assert 0.35 * (1 - 1e-5) <= nested.radii[0] <= 0.6
    assert any("nested boxes" in n for n in nested.notes)


def _interval_bounds(weights, biases, lo, hi):
    bounds = []
    for w, b in zip(weights[:-1], biases[:-1], strict=True):
        wp, wn = np.maximum(w, 0), np.minimum(w, 0)
        zl, zu = wp @ lo + wn @ hi + b, wp @ hi + wn @ lo + b
        bounds.append((zl, zu))
        lo, hi = np.maximum(zl, 0), np.maximum(zu, 0)
    return bounds


def min_margin_mip(weights, biases, c, lo, hi) -> float:
    """min_{lo <= x <= hi} c^T f(x) for a ReLU MLP, exactly (big-M MIP, scipy HiGHS)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    bounds = _interval_bounds(weights, biases, lo, hi)
    sizes = [w.shape[0] for w in weights[:-1]]
    n0 = weights[0].shape[1]
    # variables: x, then per hidden layer a (post-activation) and d (binary)
    offsets, pos = [], n0
    for n in sizes:
        offsets.append(pos)
        pos += 2 * n
    nv = pos
    rows, lb, ub = [], [], []
    var_lo, var_hi = list(lo), list(hi)
    integrality = [0] * n0
    prev = (0, n0)  # slice of the previous layer's values
    for k, n in enumerate(sizes):
        w, b = weights[k], biases[k]
        zl, zu = bounds[k]
        a0 = offsets[k]
        var_lo += [0.0] * n + [0.0] * n
        var_hi += list(np.maximum(zu, 0)) + [1.0] * n
        integrality += [0] * n + [1] * n
        for i in range(n):
            z = np.zeros(nv)
            z[prev[0]:prev[1]] = w[i]
            a = np.zeros(nv)
            a[a0 + i] = 1.0
            d = np.zeros(nv)
            d[a0 + n + i] = 1.0
            rows.append(a - z)
            lb.append(b[i])
            ub.append(np.inf)  # a >= z
            rows.append(a - z - zl[i] * d)
            lb.append(-np.inf)
            ub.append(b[i] - zl[i])  # a <= z - l (1 - d)
            rows.append(a - max(zu[i], 0) * d)
            lb.append(-np.inf)
            ub.append(0.0)  # a <= u d
        prev = (a0, a0 + n)
    obj = np.zeros(nv)
    obj[prev[0]:prev[1]] = c @ weights[-1]
    res = milp(obj, constraints=LinearConstraint(np.array(rows), lb, ub),
               integrality=np.array(integrality), bounds=Bounds(var_lo, var_hi),
               options={"mip_rel_gap": 1e-9})
    assert res.status == 0, res.message
    return float(res.fun + c @ biases[-1])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), widths=st.lists(st.integers(2, 6), min_size=1, max_size=2),
       shells=st.integers(2, 6), eps=st.sampled_from([0.1, 0.3, 1.0]))
def test_certified_shell_radius_holds_by_mip(seed, widths, shells, eps):
    rng = np.random.default_rng(seed)
    sizes = [3, *widths, 3]
    weights = [rng.standard_normal((sizes[i + 1], sizes[i])) for i in range(len(sizes) - 1)]
    biases = [rng.uniform(-0.5, 0.5, sizes[i + 1]) for i in range(len(sizes) - 1)]
    graph = mlp_graph(weights, biases, O.Relu())
    x = rng.uniform(0, 1, (1, 3))
    x[0, 0] = 0.0  # a coordinate on the domain's edge: its box side is clipped
    h = x[0]
    for w, b in zip(weights[:-1], biases[:-1], strict=True):
        h = np.maximum(w @ h + b, 0.0)
    logits = weights[-1] @ h + biases[-1]
    y = np.array([int(np.argmax(logits))])
    options = {"domain": (0.0, 1.0)}
    # the MIP is the truth here, not certify's own attack (self_check off)
    nested = C.certify(graph, x, y, eps=eps, method="local", norm="inf", options=options,
                       shells=shells, self_check=False)
    plain = C.certify(graph, x, y, eps=eps, method="local", norm="inf", options=options,
                      shells=1, self_check=False)
    radius = float(nested.radii[0])
    assert radius >= float(plain.radii[0]) * (1 - 1e-9)  # never below the plain radius
    if radius > 0:
        lo, hi = np.maximum(x[0] - radius, 0.0), np.minimum(x[0] + radius, 1.0)
        for j in range(3):
            if j == y[0]:
                continue
            c = np.zeros(3)
            c[y[0]], c[j] = 1.0, -1.0
            assert min_margin_mip(weights, biases, c, lo, hi) > -1e-7


def test_branching_on_shells_only_grows_the_radius():
    import lipcert

    data = np.load(MODELS / "digits_test.npz")
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x, y = data["x"][:3], data["y"][:3]
    options = {"domain": (0.0, 1.0)}
    root = C.certify(graph, x, y, eps=0.05, method="local", norm="inf", options=options,
                     shells=3)
    bab = C.certify(graph, x, y, eps=0.05, method="local", norm="inf",
                    options={**options, "bab_time": 1.0}, shells=3)
    assert np.all(bab.radii >= root.radii)


def test_shells_refused_where_they_mean_nothing(tmp_path):
    graph = _hinge_net()
    x, y = np.zeros((1, 1)), np.array([0])
    with pytest.raises(InputError, match="box-scoped"):
        C.certify(graph, x, y, eps=1.0, method="naive", norm="inf", shells=3)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(InputError, match="shells"):
            C.certify(graph, x, y, eps=1.0, method="local", norm="inf", shells=bad)
    data = tmp_path / "d.npz"
    source = np.load(MODELS / "digits_test.npz")
    np.savez(data, x=source["x"][:2], y=source["y"][:2])
    model = str(MODELS / "digits_mlp.onnx")
    runner = CliRunner()
    result = runner.invoke(cli, ["certify", model, "--data", str(data), "--eps", "0.05",
                                 "-n", "inf", "--shells", "0", "-m", "local"])
    assert result.exit_code == 2 and "shells" in result.output
    ckpt = tmp_path / "run.jsonl"
    first = runner.invoke(cli, ["certify", model, "--data", str(data), "--eps", "0.05", "-n",
                                "inf", "-m", "local", "--shells", "2", "--checkpoint",
                                str(ckpt)])
    assert first.exit_code == 0, first.output
    again = runner.invoke(cli, ["certify", model, "--data", str(data), "--eps", "0.05", "-n",
                                "inf", "-m", "local", "--shells", "3", "--checkpoint",
                                str(ckpt), "--resume"])
    assert again.exit_code == 2 and "shells" in again.output
