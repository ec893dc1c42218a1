"""LipSDP on residual graphs: each residual block y = S x + A sigma(B x + b) is one LMI with
the skip in its output map, blocks multiply. On SLL layers (Araujo et al., ICLR 2023) and
their AOL-style special case (q = 1) the bound is within 1% of 1 per block, while naive and
gram give 1 + ||A|| ||B||; every bound stays above sampled gradient norms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import MODELS, export, sampled_gradient_lower

import lipcert
from lipcert.cli import cli
from lipcert.ir.residual import cut_positions, residual_parts

ROOT = MODELS.parent


class SLL(torch.nn.Module):
    """x - 2 W T^-1 relu(W^T x + b), T = diag(sum_j |W^T W|_ij q_j / q_i) (SLL, Thm 3);
    ``aol`` fixes q = 1 (AOL's rescaling, Prach and Lampert, ECCV 2022)."""

    def __init__(self, n: int, m: int, seed: int, aol: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(n, m, generator=g) / n ** 0.5)
        self.b = torch.nn.Parameter(0.1 * torch.randn(m, generator=g))
        self.log_q = torch.nn.Parameter(torch.zeros(m) if aol else
                                        0.3 * torch.randn(m, generator=g))

    def forward(self, x):
        q = torch.exp(self.log_q)
        t = (torch.abs(self.w.T @ self.w) * q[None, :] / q[:, None]).sum(1)
        return x - 2.0 * (torch.relu(x @ self.w + self.b) / t) @ self.w.T


class Residual(torch.nn.Module):
    """Blocks, then a head; ``head_scale`` 1 keeps the orthonormal head rows."""

    def __init__(self, blocks, n: int, n_out: int, head_scale: float = 1.0):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)
        q = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(7)))[0]
        self.head = torch.nn.Linear(n, n_out)
        self.head.weight.data = head_scale * q[:n_out].contiguous()

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class PlainBlock(torch.nn.Module):
    """x + V relu(U x + c): an ordinary residual block (not 1-Lipschitz)."""

    def __init__(self, n: int, m: int, seed: int, depth: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for k in range(depth):
            layers += [torch.nn.Linear(n if k == 0 else m, m), torch.nn.ReLU()]
        self.branch = torch.nn.Sequential(*layers, torch.nn.Linear(m, n))

    def forward(self, x):
        return x + self.branch(x)


def _load(module, n, path):
    return lipcert.load(export(module.eval(), torch.randn(1, n), path))


@pytest.mark.parametrize("aol", [False, True], ids=["sll", "aol-style"])
def test_one_lipschitz_residual_layers_are_certified_near_one(aol, tmp_path):
    n, m = 12, 20
    net = Residual([SLL(n, m, s, aol) for s in range(3)], n, 4)
    graph = _load(net, n, tmp_path / "net.onnx")
    parts = residual_parts(graph, "lipsdp", 10**7)
    assert [p.skip for p in parts] == [True, True, True]  # the head folds into the last
    result = lipcert.bound(graph, "lipsdp", "2")
    per_block = [p["bound"] for p in result.details["residual_parts"]]
    assert all(1.0 - 1e-6 <= b <= 1.01 for b in per_block), per_block
    assert result.upper <= 1.01
    naive = lipcert.bound(graph, "naive", "2").upper
    assert naive > 1.5 * result.upper  # 1 + ||A|| ||B|| per block
    assert sampled_gradient_lower(graph, "2") <= result.upper


@pytest.mark.parametrize("depth", [1, 2])
def test_ordinary_residual_nets_are_sound_and_tighter_than_naive(depth, tmp_path):
    n, m = 6, 10
    net = Residual([PlainBlock(n, m, s, depth) for s in range(2)], n, 3, head_scale=2.0)
    graph = _load(net, n, tmp_path / "net.onnx")
    for norm in ("2", "inf"):
        result = lipcert.bound(graph, "lipsdp", norm)
        assert result.upper is not None, result.notes
        lower = sampled_gradient_lower(graph, norm, samples=256)
        assert lower * (1 - 1e-9) <= result.upper
        assert result.upper <= lipcert.bound(graph, "naive", norm).upper * (1 + 1e-9)


def test_cuts_split_at_values_nothing_bypasses(tmp_path):
    n = 6
    net = Residual([PlainBlock(n, 8, 0), PlainBlock(n, 8, 1)], n, 3)
    graph = _load(net, n, tmp_path / "net.onnx")
    cuts = cut_positions(graph)
    kinds = [type(node.op).__name__ for node in graph.nodes]
    assert [kinds[i] for i in cuts[:2]] == ["Add", "Add"]  # a block ends at its Add
    assert cuts[-1] == len(graph.nodes) - 1


def test_a_skip_into_an_activation_is_refused_by_name(tmp_path):
    class Dense(torch.nn.Module):  # relu(W2 relu(W1 x) + V x), then a skip over it all
        def __init__(self):
            super().__init__()
            self.w1, self.w2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 4)
            self.v, self.out = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            h = torch.relu(self.w1(x))
            return self.out(torch.relu(self.w2(h) + self.v(x)) + h[:, :4])

    graph = _load(Dense(), 4, tmp_path / "dense.onnx")
    result = lipcert.bound(graph, "lipsdp", "2")
    assert result.upper is None
    assert "reads an earlier activation" in result.notes[-1] and "Relu" in result.notes[-1]


def test_the_bundled_sll_model_verifies_its_claim(tmp_path):
    claim = json.loads((MODELS / "digits_sll.claim.json").read_text())
    graph = lipcert.load(MODELS / claim["model"])
    result = lipcert.bound(graph, "lipsdp", "2")
    assert result.upper <= 1.001 * claim["lipschitz_l2"]
    assert all(p["bound"] <= 1.01 for p in result.details["residual_parts"])
    assert sampled_gradient_lower(graph, "2", samples=64) <= result.upper
    out = tmp_path / "c.json"
    run = CliRunner().invoke(cli, ["certify", "--config",
                                   str(ROOT / "configs" / "certify-digits-sll.toml"),
                                   "--json", str(out)])
    assert run.exit_code == 0, run.output
    summary = json.loads(out.read_text())["summary"]
    assert summary["certified_accuracy"] >= claim["certified_accuracy"] - 1e-9
    assert summary["eps"] == claim["eps"]


def test_global_pair_bounds_scale_one_bound(tmp_path):
    full = np.load(MODELS / "digits_test.npz")
    data = tmp_path / "d.npz"
    np.savez(data, x=full["x"][:30], y=full["y"][:30])
    args = ["certify", str(MODELS / "digits_mlp.onnx"), "--data", str(data), "--eps", "0.05"]
    each, glob = tmp_path / "each.json", tmp_path / "global.json"
    assert CliRunner().invoke(cli, [*args, "--json", str(each)]).exit_code == 0
    assert CliRunner().invoke(cli, [*args, "--pair-bounds", "global",
                                    "--json", str(glob)]).exit_code == 0
    a, b = json.loads(each.read_text()), json.loads(glob.read_text())
    total = lipcert.bound(lipcert.load(MODELS / "digits_mlp.onnx"), "naive", "2").upper
    pb = np.array(b["pair_bounds"])
    assert np.allclose(pb[~np.eye(10, dtype=bool)], np.sqrt(2) * total, rtol=1e-12)
    assert np.all(np.array(a["pair_bounds"]) <= pb * (1 + 1e-12))  # each pair: tighter
    run = CliRunner().invoke(cli, ["certify", str(MODELS / "digits_mlp.onnx"), "--data",
                                   str(data), "--eps", "0.05", "-m", "local", "-n", "inf",
                                   "--pair-bounds", "global"])
    assert run.exit_code == 2 and "global methods" in run.output


def test_conv_residual_blocks_are_unrolled_and_sound(tmp_path):
    class ConvBlock(torch.nn.Module):  # relu(x + conv(relu(conv(x)))), then a 1x1 projection
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(2, 3, 3, padding=1)
            self.c2 = torch.nn.Conv2d(3, 2, 3, padding=1)
            self.proj = torch.nn.Conv2d(2, 3, 1, stride=2)
            self.head = torch.nn.Linear(3 * 3 * 3, 4)

        def forward(self, x):
            x = torch.relu(x + self.c2(torch.relu(self.c1(x))))
            y = self.proj(x) + torch.nn.functional.avg_pool2d(self.c1(x), 2)
            return self.head(torch.relu(y).flatten(1))

    torch.manual_seed(0)
    graph = lipcert.load(export(ConvBlock().eval(), torch.randn(1, 2, 6, 6),
                                tmp_path / "conv.onnx"))
    result = lipcert.bound(graph, "lipsdp", "2")
    assert result.upper is not None, result.notes
    assert any(p["skip"] for p in result.details["residual_parts"])
    assert sampled_gradient_lower(graph, "2", samples=128) * (1 - 1e-9) <= result.upper
    assert result.upper <= lipcert.bound(graph, "naive", "2").upper * (1 + 1e-9)
