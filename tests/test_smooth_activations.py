"""ELU, Softplus, GELU and SiLU: their relaxations against dense grids, their tabled extremes
against a fine search, and their import from both torch exporters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import export

import lipcert
from lipcert.estimators.local.relaxations import relax
from lipcert.ir import ops as O

FUNCTIONS = {
    "elu0.5": (O.Elu(0.5), lambda z: F.elu(z, 0.5)),
    "elu1": (O.Elu(1.0), lambda z: F.elu(z, 1.0)),
    "elu2": (O.Elu(2.0), lambda z: F.elu(z, 2.0)),
    "softplus": (O.Softplus(), lambda z: torch.logaddexp(z, torch.zeros_like(z))),
    "gelu": (O.Gelu(), F.gelu),
    "silu": (O.Silu(), F.silu),
    "sigmoid": (O.Sigmoid(), torch.sigmoid),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_relaxation_holds_on_a_dense_grid(name):
    """On random intervals (around the kinks, peaks and minima, and far out): the lines
    enclose the function, the output bounds contain it, and every difference quotient lies
    in the derivative interval. A relaxation that ignored GELU's dip or the derivative's
    peaks fails this (checked by mutation: the minimum tabled at -0.16 fails)."""
    op, fn = FUNCTIONS[name]
    rng = np.random.default_rng(0)
    centres = rng.choice([-3.0, -2.4, -1.41, -1.28, -0.75, 0.0, 1.41, 2.4, 5.0, -30.0],
                         400) + rng.normal(0, 0.5, 400)
    widths = 10.0 ** rng.uniform(-4, 1, 400)
    l = torch.as_tensor(centres - widths / 2)
    u = torch.as_tensor(centres + widths / 2)
    r = relax(op, l, u, torch.zeros_like(l))
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)[:, None]
    z = l + (u - l) * t  # (grid, intervals)
    f = fn(z)
    tol = 1e-13 * (1 + f.abs())
    assert bool((f <= r.su * z + r.iu + tol).all())
    assert bool((f >= r.sl * z + r.il - tol).all())
    assert bool((f <= r.bu + tol).all()) and bool((f >= r.bl - tol).all())
    quotients = (f[1:] - f[:-1]) / (z[1:] - z[:-1])
    wide = widths[None, :] > 1e-3  # narrower ones: the quotients carry rounding noise
    q = quotients[:, torch.as_tensor(wide[0])]
    assert bool((q <= r.du[wide[0]] + 1e-7).all()) and bool((q >= r.dl[wide[0]] - 1e-7).all())


@pytest.mark.parametrize("name", ["gelu", "silu"])
def test_tabled_extremes_bound_a_fine_search(name):
    fn = F.gelu if name == "gelu" else F.silu
    z = torch.linspace(-12, 12, 2_400_001, dtype=torch.float64).requires_grad_(True)
    f = fn(z)
    (d,) = torch.autograd.grad(f.sum(), z)
    f = f.detach()
    ext = O.SMOOTH_EXTREMA[name]
    low, high = ext["slopes"]
    assert low <= float(d.min()) and float(d.max()) <= high
    assert high - float(d.max()) < 1e-8 and float(d.min()) - low < 1e-8  # and tight
    assert ext["minimum"] <= float(f.min()) < ext["minimum"] + 1e-8
    assert abs(float(z[f.argmin()]) - ext["argmin"]) < 1e-4
    assert O.slope_range(O.Gelu() if name == "gelu" else O.Silu()) == ext["slopes"]


@pytest.mark.parametrize("dynamo", [False, True])
def test_both_exporters_import_elu_gelu_silu(tmp_path, dynamo):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ELU(0.5), torch.nn.Linear(6, 6),
                              torch.nn.GELU(), torch.nn.Linear(6, 6), torch.nn.SiLU(),
                              torch.nn.Linear(6, 2))
    path = export(net, torch.zeros(1, 4), tmp_path / "m.onnx", opset=20, dynamo=dynamo)
    graph = lipcert.load(path)  # the onnxruntime fidelity check runs here
    kinds = [n.op.kind for n in graph.nodes]
    assert kinds == ["Dense", "Elu", "Dense", "Gelu", "Dense", "Silu", "Dense"]
    x = torch.randn(64, 4, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(net.double()(x)[:, 0].sum(), x)
    sampled = float(g.norm(dim=1).max())
    for method in ("naive", "gram", "lipsdp"):
        assert lipcert.bound(graph, method, "2").upper >= sampled


def test_softplus_and_elu_import_and_refusals(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Softplus(), torch.nn.Linear(4, 2))
    graph = lipcert.load(export(net, torch.zeros(1, 3), tmp_path / "s.onnx"))
    assert [n.op.kind for n in graph.nodes] == ["Dense", "Softplus", "Dense"]
    # tanh-approximated GELU is another function: refused by name
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.GELU(approximate="tanh"))
    path = export(net, torch.zeros(1, 3), tmp_path / "g.onnx", opset=20)
    with pytest.raises(lipcert.errors.UnsupportedOpsError, match="Gelu|Tanh|Pow|Mul"):
        lipcert.load(path)
    # a product of two different data tensors is still refused, with the SiLU form named
    class Square(torch.nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(2 * x)
    path = export(Square(), torch.zeros(1, 3), tmp_path / "q.onnx")
    with pytest.raises(lipcert.errors.UnsupportedOpsError, match="SiLU"):
        lipcert.load(path)
    assert math.isfinite(lipcert.bound(graph, "local", "inf", center=np.zeros(3), eps=0.5,
                                       bab_time=0).upper)
