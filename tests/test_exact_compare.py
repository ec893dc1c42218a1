"""The exact MIP reference against brute force, and `lipcert compare` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import export
from torch import nn

import lipcert
from lipcert.cli import cli
from lipcert.estimators.exact import lipmip_output


@pytest.mark.parametrize("seed", range(4))
def test_lipmip_matches_dense_grid_on_2d_inputs(seed):
    rng = np.random.default_rng(seed)
    w1, b1 = rng.standard_normal((6, 2)), rng.standard_normal(6)
    w2, b2 = rng.standard_normal((5, 6)), rng.standard_normal(5)
    w3 = rng.standard_normal((2, 5))
    layers = [(w1, b1), (w2, b2), (w3, np.zeros(2))]
    value = max(lipmip_output(layers, -np.ones(2), np.ones(2), i, 30)[0] for i in range(2))
    grid = np.stack(np.meshgrid(np.linspace(-1, 1, 301), np.linspace(-1, 1, 301)), -1)
    xs = grid.reshape(-1, 2)
    a1 = xs @ w1.T + b1 > 0
    a2 = np.maximum(xs @ w1.T + b1, 0) @ w2.T + b2 > 0
    sampled = max(np.abs((((w3[i] * a2) @ w2) * a1) @ w1).sum(1).max() for i in range(2))
    # every grid point gives a true Jacobian; the MIP maximises over all patterns on the box
    assert value >= sampled * (1 - 1e-9)
    assert value <= sampled * 1.02  # a fine grid finds (almost) every region


@pytest.fixture(scope="module")
def tiny_relu(tmp_path_factory):
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(),
                           nn.Linear(10, 3))
    return export(module, torch.randn(1, 4), tmp_path_factory.mktemp("t") / "tiny.onnx")


def test_exact_sits_between_lower_and_upper(tiny_relu):
    graph = lipcert.load(tiny_relu)
    options = {"domain": (-1.0, 1.0)}
    exact = lipcert.bound(graph, "exact", "inf", **options)
    lower = lipcert.bound(graph, "lower", "inf", **options)
    naive = lipcert.bound(graph, "naive", "inf")
    assert lower.lower <= exact.upper * (1 + 1e-6) <= naive.upper * (1 + 1e-6)
    assert exact.lower <= exact.upper * (1 + 1e-9)


def test_exact_refuses_large_or_nonrelu(tmp_path):
    big = nn.Sequential(nn.Linear(4, 300), nn.ReLU(), nn.Linear(300, 2))
    graph = lipcert.load(export(big, torch.randn(1, 4), tmp_path / "big.onnx"))
    result = lipcert.bound(graph, "exact", "inf")
    assert result.upper is None and "refuses" in result.notes[-1]
    tanh = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    graph = lipcert.load(export(tanh, torch.randn(1, 4), tmp_path / "tanh.onnx"))
    assert "Tanh" in lipcert.bound(graph, "exact", "inf").notes[-1]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_compare_json_markdown_plot(tiny_relu, tmp_path):
    out, md, png = tmp_path / "c.json", tmp_path / "c.md", tmp_path / "c.png"
    typo = run("compare", tiny_relu, "--methods", "naive,nope", "--norm", "inf")
    assert typo.exit_code == 2 and "unknown method 'nope'" in typo.output  # before any work
    result = run("compare", tiny_relu, "--methods", "naive,exact,local", "--norm", "inf",
                 "--domain", "-1,1", "--timeout", "120", "--json", out, "--markdown", md,
                 "--plot", png)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert set(payload) >= {"lipcert_version", "model", "results", "lower_bound", "region"}
    rows = {r["method"]: r for r in payload["results"]}
    assert list(rows) == ["naive", "exact", "local"]
    for row in rows.values():
        assert {"method", "norm", "upper", "sound", "time_s", "notes", "lower_bound", "ratio",
                "tightness", "best"} <= set(row)
    lower = payload["lower_bound"]["lower"]
    assert lower <= rows["exact"]["upper"] * (1 + 1e-6) <= rows["naive"]["upper"] * (1 + 1e-6)
    assert rows["local"]["best"] and not rows["exact"]["sound"]
    assert rows["exact"]["upper"] * (1 - 1e-7) <= rows["local"]["upper"] <= rows["naive"]["upper"]
    text = md.read_text()
    assert text.count("\n| ") >= 4 and "| naive |" in text and "**" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_compare_local_box_and_timeouts(tiny_relu, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 4), dtype=np.float32))
    out = tmp_path / "c.json"
    result = run("compare", tiny_relu, "--methods", "naive,gram", "--input", tmp_path / "x.npy",
                 "--eps", "0.1", "--json", out)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["lower_bound"]["scope"] == "box"
    assert all(r["upper"] >= payload["lower_bound"]["lower"] for r in payload["results"])
    result = run("compare", tiny_relu, "--methods", "naive", "--eps", "0.1")
    assert result.exit_code == 2


@pytest.mark.parametrize("name", ["test_small.onnx", "cartpole.onnx", "resnet_2b.onnx"])
def test_compare_on_shared_models_never_crashes(name):
    from helpers import SHARED

    if not SHARED.is_dir():
        pytest.skip("../shared/onnx is absent")
    result = run("compare", SHARED / name, "--timeout", "5", "--json", "-")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    lower = payload["lower_bound"]["lower"]
    if lower is None:  # the sampled lower bound may time out at 5 s on a loaded machine
        assert payload["lower_bound"]["details"].get("timed_out"), payload["lower_bound"]
        return
    for row in payload["results"]:
        if row["upper"] is not None and row["sound"]:
            assert row["upper"] >= lower
