"""local on max-type ops: MaxPool, Max/Min of tensors and ReduceMax/Min are written exactly
as GroupSorts of their windows (one per window size) and bounded through a knockout
tournament of ReLU compare-exchanges. Truth: the graph's own evaluator (the same function),
sampled gradients (a lower bound) and a fine gradient grid on 2-input nets (the local
constant)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import export
from test_certify import pgd_flips_batch
from test_local import box_gradient_lower, check_growing_boxes, exact_bound

import lipcert
from lipcert import certify as C
from lipcert.ir import evaluate
from lipcert.ir import ops as O
from lipcert.ir.lowering import build_affine_dag
from lipcert.ir.sorting_networks import expand_group_sorts, tournament_stages


class Lambda(torch.nn.Module):
    def __init__(self, fn, *modules):
        super().__init__()
        self.fn, self.mods = fn, torch.nn.ModuleList(modules)

    def forward(self, x):
        return self.fn(x, *self.mods)


def conv_pool(pool: torch.nn.Module, flat: int) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), pool,
                               torch.nn.Flatten(), torch.nn.Linear(flat, 2))


def two_linears(fn) -> torch.nn.Module:
    return Lambda(lambda x, a, b: fn(a(x), b(x)), torch.nn.Linear(4, 3), torch.nn.Linear(4, 3))


NETS = {
    "maxpool_3x3_s2_pad1": (conv_pool(torch.nn.MaxPool2d(3, 2, padding=1), 27), (1, 2, 6, 6)),
    "maxpool_ceil": (conv_pool(torch.nn.MaxPool2d(3, 2, ceil_mode=True), 27), (1, 2, 6, 6)),
    "maxpool_dilated": (conv_pool(torch.nn.MaxPool2d(2, 1, dilation=2), 48), (1, 2, 6, 6)),
    "maxpool_2x2": (conv_pool(torch.nn.MaxPool2d(2), 27), (1, 2, 6, 6)),
    "adaptive_max": (conv_pool(torch.nn.AdaptiveMaxPool2d(2), 12), (1, 2, 6, 6)),
    "maximum": (two_linears(torch.maximum), (1, 4)),
    "minimum": (two_linears(torch.minimum), (1, 4)),
    "amax_keepdim": (Lambda(lambda x, c: c(x).amax(dim=(2, 3), keepdim=True).flatten(1),
                            torch.nn.Conv2d(2, 3, 3)), (1, 2, 5, 5)),
    "amin_axis": (Lambda(lambda x, c: c(x).amin(dim=2).flatten(1), torch.nn.Conv2d(2, 2, 3)),
                  (1, 2, 5, 5)),
}


def load(name: str, tmp_path, dynamo: bool = False):
    torch.manual_seed(sum(map(ord, name)))
    module, shape = NETS[name]
    for part in module.modules():  # weights from the seed, whatever ran before
        if hasattr(part, "reset_parameters"):
            part.reset_parameters()
    return lipcert.load(export(module, torch.randn(shape), tmp_path / f"{name}.onnx",
                               dynamo=dynamo)), shape


@pytest.mark.parametrize("name", sorted(NETS))
def test_lowered_and_expanded_networks_are_the_same_function(name, tmp_path):
    graph, shape = load(name, tmp_path)
    assert any(isinstance(n.op, (O.MaxPool, O.Extremum, O.Reduce)) for n in graph.nodes)
    dag = build_affine_dag(graph, "local", max_ops=True)
    expanded = expand_group_sorts(dag)
    assert all(isinstance(op, O.Relu) for op in expanded.acts)
    x = torch.randn((16, int(np.prod(shape))), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(0)) * 2
    want = torch.cat([evaluate.run(graph, row.reshape(shape)).reshape(1, -1) for row in x])
    np.testing.assert_allclose(dag.forward(x)[1], want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(expanded.forward(x)[1], want, rtol=1e-12, atol=1e-12)


def test_windows_of_one_size_use_the_tournament(tmp_path):
    # MaxPool 2x2 stride 2 on 6x6: nine 4-element windows per channel, one GroupSort, and a
    # tournament of 2 stages (a full sort of 4 takes 3)
    graph, _ = load("maxpool_2x2", tmp_path)
    dag = build_affine_dag(graph, "local", max_ops=True)
    sorts = [op for op in dag.acts if isinstance(op, O.GroupSort)]
    assert [op.groups.shape for op in sorts] == [(27, 4)]
    expanded = expand_group_sorts(dag)
    assert len(expanded.acts) == len(dag.acts) - 1 + len(tournament_stages(4)) == 3
    # padded windows are split by size (corner 4, edge 6, inner 9): no position repeated
    padded = build_affine_dag(load("maxpool_3x3_s2_pad1", tmp_path)[0], "local", max_ops=True)
    sizes = sorted(op.groups.shape[1] for op in padded.acts if isinstance(op, O.GroupSort))
    assert sizes == [4, 6, 9]


def test_tournament_leaves_the_maximum_first():
    rng = np.random.default_rng(0)
    for g in range(2, 12):
        for _ in range(20):
            v = list(rng.integers(0, 4, g))
            top = max(v)
            for stage in tournament_stages(g):
                for i, j in stage:
                    v[i], v[j] = max(v[i], v[j]), min(v[i], v[j])
            assert v[0] == top
        assert sum(len(s) for s in tournament_stages(g)) == g - 1
        assert len(tournament_stages(g)) == math.ceil(math.log2(g))


@pytest.mark.parametrize("name", ["maxpool_3x3_s2_pad1", "maxpool_ceil", "minimum",
                                  "amax_keepdim"])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_growing_boxes_sound_monotone_and_below_naive(name, norm, tmp_path):
    graph, shape = load(name, tmp_path)
    center = np.random.default_rng(1).uniform(-1, 1, int(np.prod(shape)))
    check_growing_boxes(graph, norm, center, (0.0, 0.05, 0.3, 1.0), 20, 30, 100)


def test_both_exporters_give_the_same_bound(tmp_path):
    bounds = []
    for dynamo in (False, True):
        folder = tmp_path / f"dynamo{int(dynamo)}"
        folder.mkdir()
        graph, shape = load("maxpool_ceil", folder, dynamo)
        center = np.linspace(-1, 1, int(np.prod(shape)))
        bounds.append(lipcert.bound(graph, "local", "inf", center=center, eps=0.1,
                                    bab_time=0).upper)
        assert bounds[-1] >= box_gradient_lower(graph, center, 0.1, samples=40)
    assert bounds[0] == pytest.approx(bounds[1], rel=1e-9)


@pytest.mark.parametrize("fn,seed,eps", [
    (lambda h: h.reshape(-1, 3, 2).amax(-1), 0, 0.5),
    (lambda h: torch.maximum(h[:, :3], h[:, 3:]), 1, 0.4),
    (lambda h: h.reshape(-1, 2, 3).amin(-1), 2, 0.5),
])
def test_branch_and_bound_reaches_the_local_constant(fn, seed, eps, tmp_path):
    # 2 inputs: a fine grid of gradients hits every linear piece of positive area, so its
    # largest gradient is the local constant; branch-and-bound must close its gap onto it
    torch.manual_seed(seed)
    first, last = torch.nn.Linear(2, 6), torch.nn.Linear(fn(torch.zeros(1, 6)).shape[1], 2)
    module = Lambda(lambda x, a, b: b(fn(torch.relu(a(x)))), first, last)
    graph = lipcert.load(export(module, torch.randn(1, 2), tmp_path / "m.onnx"))
    center = np.array([0.1, -0.2])
    full = lipcert.bound(graph, "local", "inf", center=center, eps=eps, bab_time=math.inf,
                         max_domains=50_000)
    assert full.details["exact"] or full.details["stopped"] == "exhausted", full.notes
    grid = np.stack(np.meshgrid(*[np.linspace(-eps, eps, 401)] * 2), -1).reshape(-1, 2)
    x = torch.as_tensor(center + grid, dtype=torch.float64).requires_grad_(True)
    out = module.double()(x)  # the exported function, in float64
    jac = torch.stack([torch.autograd.grad(out[:, j].sum(), x, retain_graph=True)[0]
                       for j in range(2)], 1)
    sampled = float(jac.abs().sum(-1).max())
    assert sampled * (1 - 1e-9) <= exact_bound(full) <= sampled * 1.02


def test_certified_samples_of_a_max_pool_net_survive_pgd(tmp_path):
    graph, shape = load("maxpool_3x3_s2_pad1", tmp_path)
    x = np.random.default_rng(3).uniform(-1, 1, (24, *shape[1:]))
    with torch.no_grad():
        y = np.array([int(evaluate.run(graph, torch.as_tensor(v[None])).argmax()) for v in x])
    eps = 0.02
    cert = C.certify(graph, x, y, eps=eps, method="local", norm="inf")
    certified = np.flatnonzero(cert.certified(eps))
    assert len(certified) > 0, "the test needs certified samples"
    assert not pgd_flips_batch(graph, x[certified], y[certified], eps, "inf").any()
