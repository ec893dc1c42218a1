"""Certification: soundness against PGD attacks, monotonicity, the CI gate, reports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import MODELS

import lipcert
from lipcert import certify as C
from lipcert.cli import cli
from lipcert.ir import evaluate

DATA = MODELS / "digits_test.npz"


@pytest.fixture(scope="module")
def digits():
    return C.load_data(DATA)


def pgd_flips(graph, x, label, eps, norm, restarts=4, steps=40, seed=0):
    """Projected gradient ascent on max_j f_j - f_y inside the eps-ball; True if it flips."""
    return bool(pgd_flips_batch(graph, np.asarray(x)[None], np.array([label]), eps, norm,
                                restarts, steps, seed)[0])


def pgd_flips_batch(graph, xs, labels, eps, norm, restarts=4, steps=40, seed=0):
    """:func:`pgd_flips` for many samples at once (one batched forward and backward per
    step); returns a boolean array."""
    n = len(xs)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(np.asarray(xs), dtype=torch.float64).reshape(n, *graph.input_shape)
    ys = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    flipped = torch.zeros(n, dtype=torch.bool)
    axes = tuple(range(1, x0.dim()))

    def _norm(t):  # per-sample l2 norm, broadcastable
        return torch.linalg.vector_norm(t, dim=axes, keepdim=True)
    for restart in range(restarts):
        noise = torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1
        scale = eps * (0.5 if restart else 0.0)
        noise = noise / _norm(noise) * scale if norm == "2" else noise * scale
        delta = noise.clone().requires_grad_(True)
        step = 2.5 * eps / steps
        for _ in range(steps):
            logits = evaluate.run_batch(graph, x0 + delta).reshape(n, -1)
            is_label = torch.nn.functional.one_hot(ys, logits.shape[1]).bool()
            other = torch.where(is_label, torch.full_like(logits, -torch.inf), logits)
            loss = other.max(dim=1).values - (logits * is_label).sum(dim=1)
            flipped |= (loss > 0).detach()
            if bool(flipped.all()):
                return flipped.numpy()
            (grad,) = torch.autograd.grad(loss.sum(), delta)
            with torch.no_grad():
                if norm == "2":
                    delta += step * grad / (_norm(grad) + 1e-30)
                    size = _norm(delta)
                    delta *= torch.where(size > eps, eps / size, torch.ones_like(size))
                else:
                    delta += step * grad.sign()
                    delta.clamp_(-eps, eps)
    return flipped.numpy()


@pytest.mark.parametrize("model,norm,eps,method", [
    ("digits_mlp.onnx", "2", 0.1, "naive"),
    ("digits_mlp.onnx", "inf", 0.005, "naive"),
    ("digits_cnn.onnx", "2", 0.05, "gram"),
    ("digits_maxmin.onnx", "inf", 0.005, "naive"),
    ("digits_resnet.onnx", "2", 0.05, "gram"),
])
def test_certified_samples_survive_pgd(digits, model, norm, eps, method):
    x, y = digits
    x, y = x[:60], y[:60]
    graph = lipcert.load(MODELS / model)
    cert = C.certify(graph, x, y, eps=eps, method=method, norm=norm)
    certified = np.flatnonzero(cert.certified(eps))
    assert len(certified) > 0, "test needs some certified samples"
    flips = pgd_flips_batch(graph, x[certified], y[certified], eps, norm)
    assert not flips.any(), f"samples {certified[flips]} flipped"
    # the attack is not toothless: at a radius far beyond the certified ones it flips some
    big = 50 * float(np.max(cert.radii))
    assert pgd_flips_batch(graph, x[certified[:10]], y[certified[:10]], big, norm,
                           restarts=1).any()


@pytest.mark.parametrize("model", ["digits_mlp.onnx", "digits_maxmin.onnx"])
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_certified_accuracy_monotone_and_below_clean(digits, model, norm):
    x, y = digits
    graph = lipcert.load(MODELS / model)
    eps = 0.05 if norm == "2" else 0.002
    cert = C.certify(graph, x, y, eps=eps, norm=norm)
    accs = [cert.certified_accuracy(e) for e in np.linspace(0, 20 * eps, 30)]
    assert all(a >= b for a, b in zip(accs, accs[1:], strict=False))
    assert accs[0] <= cert.clean_accuracy and accs[-1] < accs[0]
    assert 0 < cert.certified_accuracy(eps) <= cert.clean_accuracy


def test_pair_bounds_are_tighter_than_2L(digits):
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    full = lipcert.bound(graph, "naive", "2").upper
    pairs = C.pairwise_lipschitz(graph, "naive", "2", 10)
    off = pairs[~np.eye(10, dtype=bool)]
    assert np.all(off <= 2 * full) and np.all(off > 0)
    assert np.allclose(pairs, pairs.T)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_gate_exit_codes_both_ways(tmp_path):
    base = ("certify", MODELS / "digits_mlp.onnx", "--data", DATA, "--eps", "0.1")
    passing = run(*base, "--min-certified-accuracy", "0.3")
    assert passing.exit_code == 0, passing.output
    failing = run(*base, "--min-certified-accuracy", "0.99")
    assert failing.exit_code == 1, failing.output
    assert "FAIL" in failing.output
    junit = tmp_path / "r.xml"
    run(*base, "--min-certified-accuracy", "0.99", "--junit", junit, "--junit-per-sample")
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "1" and int(suite.get("tests")) == 451


def test_json_report(tmp_path):
    out = tmp_path / "c.json"
    result = run("certify", MODELS / "digits_cnn.onnx", "--data", DATA, "--eps", "0.05",
                 "--norm", "inf", "--json", out)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert payload["summary"]["samples"] == 450 and len(payload["samples"]) == 450
    s = payload["summary"]
    assert s["certified_accuracy"] <= s["clean_accuracy"]
    assert {"index", "label", "prediction", "margin", "radius", "certified"} <= \
        set(payload["samples"][0])


def test_config_file(tmp_path):
    cfg = tmp_path / "lipcert.toml"
    cfg.write_text(f"""[certify]
model = "{MODELS / 'digits_mlp.onnx'}"
data = "{DATA}"
eps = 0.1
norm = "2"
method = "naive"
min_certified_accuracy = 0.99
""")
    assert run("certify", "--config", cfg).exit_code == 1
    assert run("certify", "--config", cfg, "--min-certified-accuracy", "0.2").exit_code == 0
    cfg.write_text("[certify]\nmodel = 'x'\nbogus = 1\n")
    result = run("certify", "--config", cfg)
    assert result.exit_code == 2 and "bogus" in result.output


def test_bad_data_gives_exit_2(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 5)), y=np.zeros(3, dtype=int))
    result = run("certify", MODELS / "digits_mlp.onnx", "--data", bad, "--eps", "0.1")
    assert result.exit_code == 2 and "takes 64" in result.output
    result = run("certify", MODELS / "digits_mlp.onnx", "--data", DATA, "--eps", "0.1",
                 "--min-certified-accuracy", "80")
    assert result.exit_code == 2
    np.save(tmp_path / "x.npy", np.load(DATA)["x"][:20])
    np.save(tmp_path / "y.npy", np.load(DATA)["y"][:20])
    result = run("certify", MODELS / "digits_mlp.onnx", "--data", tmp_path / "x.npy",
                 "--labels", tmp_path / "y.npy", "--eps", "0.05")
    assert result.exit_code == 0, result.output
