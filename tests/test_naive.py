"""Soundness of the naive estimator against independent truth: exact hand values, exact
SVDs of unrolled operators, and sampled gradient norms (true lower bounds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import exact_l2, export, sampled_gradient_lower, unrolled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lipcert
from lipcert.estimators.common import norms as N
from lipcert.ir import evaluate
from lipcert.ir import ops as O


def test_dense_hand_values():
    w = np.array([[3.0, 0.0], [4.0, 0.0]])  # spectral norm 5, max row sum 4
    assert N.spectral_norm(w) == pytest.approx(5.0, rel=1e-12) and N.spectral_norm(w) >= 5.0
    assert N.max_row_abs_sum(np.array([[1.0, -2.0], [0.5, 0.5]])) >= 3.0
    assert N.spectral_norm(np.zeros((3, 2))) == 0.0


def _conv_op(c_in, c_out, k, stride, pad, dilation, groups, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c_out, c_in // groups, k, k))
    return O.Conv(w, None, (stride, stride), pad, (dilation, dilation), groups)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(k=st.integers(1, 5), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), n=st.integers(2, 8), pad=st.integers(0, 2),
       asym=st.booleans(), seed=st.integers(0, 10**6))
def test_conv_cheap_bound_is_above_exact_unrolled_norm(k, stride, dilation, groups, n, pad,
                                                       asym, seed):
    c_in, c_out = 2 * groups, 2 * groups
    pads = (pad, 0, pad + 1, pad) if asym else (pad,) * 4
    if n + pads[0] + pads[2] < (k - 1) * dilation + 1 or n + pads[1] + pads[3] < \
            (k - 1) * dilation + 1:
        return
    op = _conv_op(c_in, c_out, k, stride, pads, dilation, groups, seed)
    in_shape = (1, c_in, n, n)
    exact = exact_l2(unrolled(lambda x: evaluate.apply(op, x), in_shape))
    bound, _ = N.conv_l2_cheap(op.weight, op.stride, op.dilation, op.groups)
    assert bound >= exact * (1 - 1e-12)
    mat = unrolled(lambda x: evaluate.apply(op, x), in_shape)
    assert N.conv_linf(op.weight) >= np.abs(mat).sum(1).max() * (1 - 1e-12)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), stride=st.integers(1, 3), n=st.integers(2, 5),
       out_pad=st.integers(0, 1), seed=st.integers(0, 10**6))
def test_conv_transpose_bounds_above_exact(k, stride, n, out_pad, seed):
    out_pad = min(out_pad, stride - 1)
    rng = np.random.default_rng(seed)
    op = O.ConvTranspose(rng.standard_normal((3, 2, k, k)), None, (stride, stride),
                         (0, 0, 0, 0), (out_pad, out_pad), (1, 1), 1)
    mat = unrolled(lambda x: evaluate.apply(op, x), (1, 3, n, n))
    assert N.conv_l2_cheap(op.weight, op.stride, op.dilation, 1)[0] >= exact_l2(mat) * (1 - 1e-12)
    assert N.conv_transpose_linf(op) >= np.abs(mat).sum(1).max() * (1 - 1e-12)


@pytest.mark.parametrize("kernel,stride,pads,ceil,include", [
    ((2, 2), (2, 2), (0, 0, 0, 0), False, True),
    ((3, 3), (1, 1), (1, 1, 1, 1), False, True),
    ((3, 3), (2, 2), (1, 1, 1, 1), True, False),
    ((4, 2), (1, 2), (0, 1, 0, 1), False, False),
])
def test_pool_bounds_above_exact(kernel, stride, pads, ceil, include):
    in_shape = (1, 2, 7, 7)
    avg = O.AvgPool(kernel, stride, pads, ceil, include)
    mat = unrolled(lambda x: evaluate.apply(avg, x), in_shape)
    l2, linf = N.nonnegative_linear_norms(avg, in_shape)
    assert l2 >= exact_l2(mat) * (1 - 1e-12) and linf >= np.abs(mat).sum(1).max() * (1 - 1e-12)
    if kernel == stride and not any(pads):  # non-overlapping: exactly 1 / sqrt(kh kw)
        assert l2 == pytest.approx(1 / math.sqrt(kernel[0] * kernel[1]), rel=1e-9)
    # MaxPool: its Clarke Jacobians at random points are selections; check the worst seen
    mp = O.MaxPool(kernel, stride, pads, (1, 1), ceil)
    bound = N.max_pool_l2(mp)
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(in_shape, dtype=torch.float64, generator=gen)
        jac = torch.autograd.functional.jacobian(lambda v: evaluate.apply(mp, v).reshape(-1), x)
        assert bound >= exact_l2(jac.reshape(jac.shape[0], -1).numpy()) * (1 - 1e-12)


def _random_net(draw_widths, act, conv):
    layers: list[nn.Module] = []
    if conv:
        layers += [nn.Conv2d(1, 3, 3, padding=1, stride=2), act(), nn.Flatten()]
        prev = 3 * 3 * 3
    else:
        layers += [nn.Flatten()]
        prev = 6
    for w in draw_widths:
        layers += [nn.Linear(prev, w), act()]
        prev = w
    layers.append(nn.Linear(prev, 3))
    return nn.Sequential(*layers), ((1, 1, 5, 5) if conv else (1, 6))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.integers(2, 12), min_size=1, max_size=3),
       act=st.sampled_from([nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU]),
       conv=st.booleans(), seed=st.integers(0, 1000))
def test_naive_is_above_sampled_gradient_norms(tmp_path_factory, widths, act, conv, seed):
    torch.manual_seed(seed)
    module, shape = _random_net(widths, act, conv)
    path = export(module, torch.randn(shape), tmp_path_factory.mktemp("n") / "m.onnx")
    graph = lipcert.load(path)
    for norm in ("2", "inf"):
        upper = lipcert.bound(graph, "naive", norm).upper
        assert upper >= sampled_gradient_lower(graph, norm, samples=24)


def test_residual_add_uses_triangle_inequality(tmp_path):
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return x + torch.relu(self.lin(x))

    module = Res()
    with torch.no_grad():
        module.lin.weight.copy_(2 * torch.eye(4))
    graph = lipcert.load(export(module, torch.randn(1, 4), tmp_path / "r.onnx"))
    assert lipcert.bound(graph, "naive", "2").upper == pytest.approx(3.0, rel=1e-5)


def test_bound_module_api():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    result = lipcert.bound_module(module, torch.randn(1, 3))
    w1, w2 = (module[i].weight.detach().double().numpy() for i in (0, 2))
    assert result.upper == pytest.approx(exact_l2(w1) * exact_l2(w2), rel=1e-5)
    assert result.upper >= exact_l2(w1) * exact_l2(w2)
