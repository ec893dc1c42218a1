"""The bundled 1-Lipschitz classifier (GroupSort2 in deel-torchlip's export form, orthogonal
layers): lipcert verifies from the ONNX file the constant and the certified accuracy that
its training claims (models/digits_lip.claim.json), and the shipped CI gate passes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import MODELS

import lipcert
from lipcert.cli import cli
from lipcert.ir import ops as O

ROOT = MODELS.parent
CLAIM = json.loads((MODELS / "digits_lip.claim.json").read_text())


@pytest.fixture(scope="module")
def graph():
    return lipcert.load(MODELS / CLAIM["model"])


def test_group_sort_is_recognised(graph):
    kinds = [type(n.op) for n in graph.nodes]
    assert kinds.count(O.GroupSort) == 2 and O.Reduce not in kinds


@pytest.mark.parametrize("method", ["naive", "gram", "lipsdp"])
def test_every_global_method_confirms_the_constant(graph, method):
    lower = lipcert.bound(graph, "lower", "2").lower
    upper = lipcert.bound(graph, method, "2").upper
    assert lower * (1 - 1e-9) <= upper <= 1.001 * CLAIM["lipschitz_l2"]
    assert lower > 0.99  # orthogonal layers and GroupSort: the constant is attained


def test_the_shipped_gate_verifies_the_training_claim(tmp_path):
    out = tmp_path / "c.json"
    result = CliRunner().invoke(cli, ["certify", "--config",
                                      str(ROOT / "configs" / "certify-digits-lip.toml"),
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())["summary"]
    assert summary["eps"] == CLAIM["eps"]
    # lipcert's radii use certified pair bounds (at most sqrt(2) L): never fewer certified
    assert summary["certified_accuracy"] >= CLAIM["certified_accuracy"] - 1e-9


def test_group_sort_indices_are_not_counted_as_parameters(graph):
    assert graph.parameter_count() == 2 * (64 * 64 + 64) + 64 * 10 + 10
