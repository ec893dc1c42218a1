"""The local estimator's scale paths lose nothing: matrix-free operators equal the unrolled
matrices, and CROWN restricted to the neurons whose relaxation the bounds can change gives
the bound of CROWN on every neuron."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import export
from torch import nn

import lipcert
from lipcert.estimators.local import jacobian as J
from lipcert.estimators.local import relaxations
from lipcert.ir import linear_operators as L
from lipcert.ir import lowering


class _Residual(nn.Module):
    """conv -> relu -> (conv + 1x1 shortcut, avg-pooled, padded) -> relu -> conv-transpose ->
    flatten -> dense: every kind of linear op the local method replays."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.short = nn.Conv2d(4, 4, 1, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.AvgPool2d(2, stride=1, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
        self.fc = nn.Linear(3 * 12 * 12, 4)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.pool(self.bn(self.c2(h)) + self.short(h)))
        h = torch.relu(self.up(nn.functional.pad(h, (0, 1, 0, 1))))
        return self.fc(h.flatten(1))


@pytest.fixture(scope="module")
def residual_graph(tmp_path_factory):
    torch.manual_seed(3)
    net = _Residual()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    path = export(net, torch.zeros(1, 2, 8, 8), tmp_path_factory.mktemp("res") / "res.onnx")
    return lipcert.load(path)


def _all_implicit(monkeypatch):
    monkeypatch.setattr(lowering, "IMPLICIT_FRACTION", float("inf"))
    lowering._DAG_CACHE.clear()


def test_operators_equal_the_unrolled_matrices(residual_graph, monkeypatch):
    _all_implicit(monkeypatch)
    dag = lowering.build_affine_dag(residual_graph, "local")
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for affine in [*dag.pre, dag.out]:
        assert set(affine.ops) == set(affine.maps)
        for j, m in affine.maps.items():
            op = affine.ops[j]
            p_in = torch.randn(3, 5, m.shape[1], generator=gen, dtype=torch.float64)
            p_out = torch.randn(7, m.shape[0], generator=gen, dtype=torch.float64)
            scale = float(m.abs().max())
            assert torch.allclose(op.times_transpose(p_in), p_in @ m.T, atol=1e-12 * scale,
                                  rtol=1e-12)
            assert torch.allclose(op.times(p_out), p_out @ m, atol=1e-12 * scale, rtol=1e-12)
            checked += 1
    assert checked == 4  # z1, z2 (conv + shortcut), z3, the output


def test_chunks_cover_every_row():
    m = torch.randn(6, 4, dtype=torch.float64)
    op = L.dense(m)
    p = torch.randn(2 * L.CHUNK_ROWS + 3, 6, dtype=torch.float64)
    assert torch.allclose(op.times(p), p @ m)
    q = torch.randn(L.CHUNK_ROWS + 1, 4, dtype=torch.float64)
    assert torch.allclose(op.times_transpose(q), q @ m.T)


def test_local_bound_is_the_same_through_operators(residual_graph, monkeypatch):
    center = np.random.default_rng(1).uniform(-0.5, 0.5, 2 * 8 * 8)
    dense = lipcert.bound(residual_graph, "local", "inf", center=center, eps=0.05,
                          bab_time=0, self_check=False).upper
    _all_implicit(monkeypatch)
    implicit = lipcert.bound(residual_graph, "local", "inf", center=center, eps=0.05,
                             bab_time=0, self_check=False).upper
    assert implicit == pytest.approx(dense, rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_sparse_crown_matches_crown_on_every_neuron(residual_graph, monkeypatch, seed, eps):
    """Sparse intermediate bounds: the Jacobian bound of CROWN restricted to the neurons
    intervals leave unstable is the bound of CROWN on all neurons (to rounding), and never
    below it (the skipped neurons keep interval bounds, which are looser)."""
    dag = lowering.cached_affine_dag(residual_graph, "local")
    center = np.random.default_rng(seed).uniform(-0.5, 0.5, dag.sizes[0])
    xl = torch.as_tensor(center - eps)[None]
    xu = torch.as_tensor(center + eps)[None]
    c = torch.eye(dag.out.bias.numel(), dtype=torch.float64)

    def bound():
        fwd = J.forward_bounds(dag, xl.expand(len(c), -1), xu.expand(len(c), -1))
        return J.jacobian_bound(dag, fwd, c).upper, fwd

    sparse, fwd_sparse = bound()
    with monkeypatch.context() as patch:
        patch.setattr(J, "needs_bounds", lambda op, l, u: torch.ones_like(l, dtype=torch.bool))
        full, fwd_full = bound()
    assert torch.all(sparse >= full * (1 - 1e-12))
    assert torch.allclose(sparse, full, rtol=1e-9)
    for r_s, r_f in zip(fwd_sparse.relax, fwd_full.relax, strict=True):
        assert torch.equal(r_s.mixed, r_f.mixed)  # the same unstable neurons


def test_needs_bounds_marks_kinks_inside_only():
    from lipcert.ir import ops as O

    l = torch.tensor([-1.0, 0.0, -2.0, 0.5, -0.5, float("nan")])
    u = torch.tensor([1.0, 2.0, 0.0, 0.7, 3.0, 1.0])
    relu = relaxations.needs_bounds(O.Relu(), l, u)
    assert relu.tolist() == [True, False, False, False, True, False]
    clip = relaxations.needs_bounds(O.Clip(0.0, 1.0), l, u)
    assert clip.tolist() == [True, True, False, False, True, False]
    assert relaxations.needs_bounds(O.Tanh(), l, u).all()
