"""Points on a kink are not witnesses: autograd's one-sided derivatives there (and activation
patterns that hold only on a kink hyperplane) can give a 'gradient' no nearby point has.

f(x) = relu(x + 1) - relu(x) + relu(-x) - 1 is constant (0) on [-1, inf), but autograd at
x = 0 says f'(0) = 1, and the pattern 'both kinked ReLUs inactive' is LP-feasible at x = 0
only. Every lower value lipcert reports (local's attained bound, exact's incumbent, the
self-check's sampled Jacobians, compare's tightness yardstick) must stay at the true 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import export
from torch import nn

import lipcert
from lipcert.estimators.common.region import nudged
from lipcert.selfcheck import quick_lower


@pytest.fixture(scope="module")
def flat_near_zero(tmp_path_factory):
    net = nn.Sequential(nn.Linear(1, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0], [1.0], [-1.0]]))
        net[0].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
        net[2].weight.copy_(torch.tensor([[1.0, -1.0, 1.0]]))
        net[2].bias.fill_(-1.0)
    path = export(net, torch.zeros(1, 1), tmp_path_factory.mktemp("kink") / "flat.onnx")
    return lipcert.load(path)


def test_autograd_at_the_kink_would_claim_a_slope(flat_near_zero):
    x = torch.zeros(1, 1, requires_grad=True)  # the trap the checks below avoid
    (grad,) = torch.autograd.grad(lipcert.ir.evaluate.run(flat_near_zero, x).sum(), x)
    assert float(grad.abs().sum()) == 1.0


def test_local_does_not_call_a_kink_pattern_attained(flat_near_zero):
    res = lipcert.bound(flat_near_zero, "local", "inf", center=np.zeros(1), eps=0.5)
    assert res.upper is not None and res.upper >= 0  # 1 is a valid (loose) bound
    assert res.lower is None or res.lower < 1e-6, res.lower
    assert not res.details["exact"]  # the gap to the true 0 is not "closed"


def test_exact_reports_only_an_attained_incumbent(flat_near_zero):
    res = lipcert.bound(flat_near_zero, "exact", "inf", center=np.zeros(1), eps=0.5)
    assert res.lower < 1e-6
    assert any("attained only up to" in n for n in res.notes)


def test_self_check_points_avoid_kinks(flat_near_zero):
    box = (np.full(1, -0.5), np.full(1, 0.5))
    assert quick_lower(flat_near_zero, "inf", box=box)[0] < 1e-6


def test_compare_tightness_uses_no_kink_value(flat_near_zero):
    from lipcert import compare as CMP

    region = {"center": np.zeros(1), "eps": 0.5}
    results = [lipcert.bound(flat_near_zero, m, "inf", **(region if m != "naive" else {}))
               for m in ("naive", "local", "exact")]
    lower = lipcert.bound(flat_near_zero, "lower", "inf", **region)
    best = CMP.best_lower(results, lower, True)
    assert best is None or best.value < 1e-6


def test_nudged_points_stay_in_the_box_and_leave_the_corners():
    rng = np.random.default_rng(0)
    low, high = np.zeros(5), np.array([1.0, 2.0, 0.5, 1.0, 0.0])
    corner = high.copy()
    moved = nudged(corner, low, high, rng)
    assert np.all(moved >= low) and np.all(moved <= high)
    assert np.all(moved[:4] < corner[:4]) and moved[4] == 0.0
