"""GroupSort and MaxMin in every common export form become the one GroupSort IR op.

Each form below is a torch module the way people write it (deel-torchlip's GroupSort2,
reference MaxMin code, torch.sort / torch.max(dim) / amax / amin, strided or split halves,
channel pairs of conv feature maps), exported with both torch exporters. After import the
graph must hold exactly one GroupSort and no max/min left; import fidelity against
onnxruntime is checked by ``load``; with orthogonal layers every global method must report
at most 1.001 (the exact constant is at most 1) and never less than a sampled lower bound.
Near misses (overlapping pairs, a max without its min) are kept as max/min, said in the
notes, bounded soundly by naive and refused by name by lipsdp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import export
from test_local import box_gradient_lower
from torch import nn

import lipcert
from lipcert.ir import ops as O


class GroupSort2Keep(nn.Module):  # deel-torchlip GroupSort2: amin/amax over pairs, keepdim
    def forward(self, x):
        p = x.reshape(x.shape[0], -1, 2)
        return torch.cat([p.amin(-1, keepdim=True), p.amax(-1, keepdim=True)], -1
                         ).reshape(x.shape)


class PairsStacked(nn.Module):  # reference MaxMin: consecutive pairs, max and min stacked
    def forward(self, x):
        p = x.reshape(x.shape[0], -1, 2)
        return torch.stack([p.max(-1).values, p.min(-1).values], -1).reshape(x.shape)


class PairsCat(nn.Module):  # torch.max(dim) values, maxima first then minima
    def forward(self, x):
        p = x.reshape(x.shape[0], -1, 2)
        return torch.cat([torch.max(p, -1).values, torch.min(p, -1).values], 1)


class SortAscending(nn.Module):  # GroupSort of size 4 by torch.sort
    def forward(self, x):
        return torch.sort(x.reshape(x.shape[0], -1, 4), -1).values.reshape(x.shape)


class TopKDescending(nn.Module):
    def forward(self, x):
        return torch.topk(x.reshape(x.shape[0], -1, 4), 4, -1).values.reshape(x.shape)


class StridedHalves(nn.Module):
    def forward(self, x):
        a, b = x[:, ::2], x[:, 1::2]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)


class SplitHalves(nn.Module):
    def forward(self, x):
        a, b = torch.split(x, x.shape[1] // 2, 1)
        return torch.cat([torch.minimum(a, b), torch.maximum(a, b)], 1)


class ChannelPairs(nn.Module):  # conv feature maps: channel pairs at every pixel
    def forward(self, x):
        n, c, h, w = x.shape
        p = x.reshape(n, c // 2, 2, h, w)
        return torch.cat([p.amax(2, keepdim=True), p.amin(2, keepdim=True)], 2
                         ).reshape(n, c, h, w)


DENSE_FORMS = [GroupSort2Keep, PairsStacked, PairsCat, SortAscending, TopKDescending,
               StridedHalves, SplitHalves]


def orthogonal(layer: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        nn.init.orthogonal_(layer.weight)
        layer.bias.normal_()
    return layer


def exported(module, example, path, dynamo: bool):
    # the dynamo exporter writes opset 18; converting down to 17 can emit invalid nodes
    return export(module, example, path, opset=18 if dynamo else 17, dynamo=dynamo)


def ops_of(graph) -> list[type]:
    return [type(n.op) for n in graph.nodes]


def assert_between_lower_and(graph, limit: float, methods=("naive", "gram", "lipsdp")):
    lower = lipcert.bound(graph, "lower", "2").lower
    for method in methods:
        res = lipcert.bound(graph, method, "2")
        assert res.upper is not None, (method, res.notes)
        assert lower * (1 - 1e-9) <= res.upper <= limit, (method, res.upper, lower)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("form", DENSE_FORMS, ids=lambda f: f.__name__)
def test_dense_forms_become_one_group_sort(form, dynamo, tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(orthogonal(nn.Linear(8, 8)), form(), orthogonal(nn.Linear(8, 8)))
    graph = lipcert.load(exported(net, torch.randn(1, 8), tmp_path / "m.onnx", dynamo))
    kinds = ops_of(graph)
    assert kinds.count(O.GroupSort) == 1, kinds
    assert O.Extremum not in kinds and O.Reduce not in kinds, kinds
    assert_between_lower_and(graph, 1.001)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_channel_pairs_of_a_conv_map(dynamo, tmp_path):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), ChannelPairs(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 3))
    graph = lipcert.load(exported(net, torch.randn(1, 1, 5, 5), tmp_path / "c.onnx",
                                  dynamo))
    (sort,) = [n for n in graph.nodes if isinstance(n.op, O.GroupSort)]
    assert sort.op.axis == 1 and sort.op.groups.shape == (2, 2)
    naive = lipcert.bound(graph, "naive", "2").upper
    assert_between_lower_and(graph, naive * (1 + 1e-9))


class OverlappingPairs(nn.Module):
    def forward(self, x):
        a, b = x[:, :-1], x[:, 1:]
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1)


class MaxOut(nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], -1, 2).amax(-1)


@pytest.mark.parametrize("form", [OverlappingPairs, MaxOut], ids=lambda f: f.__name__)
def test_near_misses_are_kept_and_bounded_soundly(form, tmp_path):
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 8), form(), nn.LazyLinear(2))
    net(torch.randn(1, 6))
    graph = lipcert.load(export(net, torch.randn(1, 6), tmp_path / "n.onnx"))
    assert O.GroupSort not in ops_of(graph)
    if form is OverlappingPairs:
        assert any("not a GroupSort" in n and "kept as max/min" in n for n in graph.notes)
    lower = lipcert.bound(graph, "lower", "2").lower
    for norm in ("2", "inf"):
        assert lipcert.bound(graph, "naive", norm).upper >= lipcert.bound(
            graph, "lower", norm).lower * (1 - 1e-9)
    res = lipcert.bound(graph, "lipsdp", "2")
    assert res.upper is None and "does not support op" in res.notes[-1]
    assert lower > 0


def _torchlip_net(kind: str, conv: bool):
    tl = pytest.importorskip("deel.torchlip")
    act = {"GroupSort2": tl.GroupSort2, "FullSort": tl.FullSort,
           "GroupSort3": lambda: tl.GroupSort(3)}[kind]()
    if conv:
        return tl.Sequential(tl.SpectralConv2d(1, 4, 3, padding=1), act, nn.Flatten(),
                             tl.SpectralLinear(4 * 6 * 6, 3)), torch.randn(1, 1, 6, 6)
    return tl.Sequential(tl.SpectralLinear(6, 12), act, tl.SpectralLinear(12, 12), act,
                         tl.SpectralLinear(12, 3)), torch.randn(1, 6)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("kind,conv", [("GroupSort2", False), ("FullSort", False),
                                       ("GroupSort3", False), ("GroupSort2", True)])
def test_deel_torchlip_exports(kind, conv, dynamo, tmp_path):
    if conv and kind != "GroupSort2":
        pytest.skip("conv nets use GroupSort2")
    torch.manual_seed(3)
    net, example = _torchlip_net(kind, conv)
    net.eval()
    plain = net.vanilla_export()  # what deel-torchlip documents before export
    graph = lipcert.load(exported(plain, example, tmp_path / "tl.onnx", dynamo))
    kinds = ops_of(graph)
    assert O.GroupSort in kinds and O.Extremum not in kinds and O.Reduce not in kinds, kinds
    norms = [float(np.linalg.norm(m.weight.detach().numpy().reshape(m.weight.shape[0], -1), 2))
             for m in plain.modules() if isinstance(m, nn.Linear)]
    naive = lipcert.bound(graph, "naive", "2").upper
    if not conv:  # dense layers: the product of their spectral norms (deel: about 1)
        assert naive <= 1.001 * float(np.prod(norms)), (naive, norms)
    methods = ("naive", "gram", "lipsdp") if kind == "GroupSort2" or not conv else ("naive",)
    assert_between_lower_and(graph, naive * (1 + 1e-9), methods)


TF2ONNX = Path(__file__).parent / "data" / "tf2onnx"


@pytest.mark.parametrize("name,group", [("gs2", 2), ("fullsort", 32), ("gs4", 4)])
def test_deel_lip_keras_exports_by_tf2onnx(name, group):
    # real exports (tests/data/tf2onnx/export_deel_lip.py): GroupSort2 as Split/Min/Max/
    # Concat, FullSort and GroupSort(4) as Neg/TopK/Neg (an ascending sort)
    graph = lipcert.load(TF2ONNX / f"deel_{name}.onnx")
    sorts = [n.op for n in graph.nodes if isinstance(n.op, O.GroupSort)]
    kinds = ops_of(graph)
    assert len(sorts) == 2 and O.Extremum not in kinds and O.Scale not in kinds, kinds
    assert all(op.groups.shape[1] == group for op in sorts)
    norms = [float(np.linalg.norm(n.op.weight, 2)) for n in graph.nodes
             if isinstance(n.op, O.Dense)]
    assert_between_lower_and(graph, 1.001 * float(np.prod(norms)))
    center = np.random.default_rng(0).uniform(-1, 1, 16)
    local = lipcert.bound(graph, "local", "inf", center=center, eps=0.05, bab_time=0)
    assert local.upper >= box_gradient_lower(graph, center, 0.05, samples=40)
