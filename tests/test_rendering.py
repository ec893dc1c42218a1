"""What a person sees: tables at 80 columns (a CI log) keep every word whole and fold long
notes under their row; wide terminals get the plain grid; certify states its notes; compare
rates each bound against the best lower value that applies to it and says which."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import MODELS, export
from torch import nn

from lipcert.cli import cli


def run(*args, columns: int = 80):
    return CliRunner().invoke(cli, [str(a) for a in args], env={"COLUMNS": str(columns)})


def words(text: str) -> set[str]:
    return set(text.split())


def assert_fits_and_whole(output: str, texts: list[str], width: int = 80) -> None:
    lines = output.splitlines()
    too_long = [line for line in lines if len(line) > width]
    assert not too_long, too_long[:3]
    seen = words(output)
    broken = [w for t in texts for w in t.split() if w not in seen]
    assert not broken, f"words split across lines: {broken[:5]}"


@pytest.fixture(scope="module")
def wide_relu(tmp_path_factory):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 50), nn.ReLU(), nn.Linear(50, 3))
    return export(net, torch.zeros(1, 4), tmp_path_factory.mktemp("wide") / "wide_relu.onnx")


def test_bound_at_80_columns_folds_notes_under_the_row(tmp_path):
    out = tmp_path / "b.json"
    result = run("bound", MODELS / "digits_mlp.onnx", "--json", out)
    assert result.exit_code == 0, result.output
    notes = json.loads(out.read_text())["results"][0]["notes"]
    assert_fits_and_whole(result.output, notes)
    lines = result.output.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("digits_mlp.onnx"))
    assert lines[row + 1].lstrip().startswith("notes:")  # right under its row


def test_wide_terminals_keep_the_grid():
    result = run("bound", MODELS / "digits_mlp.onnx", columns=300)
    assert result.exit_code == 0 and "┃" in result.output and "notes" in result.output


def test_methods_and_inspect_at_80_columns():
    from lipcert.estimators import REGISTRY, load_all

    load_all()
    result = run("methods")
    assert result.exit_code == 0, result.output
    assert_fits_and_whole(result.output, [e.summary for e in REGISTRY.values()])
    result = run("inspect", MODELS / "digits_resnet.onnx")
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_compare_at_80_columns_states_each_lower_bound(wide_relu, tmp_path):
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    cfg = tmp_path / "c.toml"  # a short branch-and-bound; every method well inside its time
    cfg.write_text("[methods.local]\nbab_time = 1.0\n")
    result = run("compare", wide_relu, "--methods", "naive,local,exact", "--norm", "inf",
                 "--json", out, "--plot", png, "--timeout", "30", "--config", cfg)
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    rows = {r["method"]: r for r in payload["results"]}
    # exact refuses the box before solving (too many unstable ReLUs), with the reason shown
    assert rows["exact"]["upper"] is None and "unstable" in rows["exact"]["notes"][-1]
    assert_fits_and_whole(result.output, [rows["exact"]["notes"][-1]])
    # local bounds its own default box: only a value on that box rates it, never the
    # global sample (which may lie outside the box)
    local = rows["local"]
    assert local["lower_bound_source"] in (None, "local's attained value")
    assert rows["naive"]["lower_bound"] == max(
        v for v in (payload["lower_bound"]["lower"], local["lower"]) if v is not None)
    best = payload["best_lower_bound"]
    assert best["value"] == rows["naive"]["lower_bound"]
    assert best["source"] in result.output  # the title says which
    assert "lower" in result.output.split("─")[-1]  # the sampled yardstick's row and time
    # the plot marks exact, which gave no bound (a figure is written; its look was checked
    # by eye: shared baseline, legend, the reason under a red cross)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exact_refuses_hard_boxes_before_solving(wide_relu):
    result = run("bound", wide_relu, "-m", "exact", "-n", "inf")
    assert result.exit_code == 2
    assert "unstable" in result.output and "max_unstable" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_certify_table_states_its_notes(tmp_path):
    data = np.load(MODELS / "digits_test.npz")
    np.savez(tmp_path / "d.npz", x=data["x"][:20], y=data["y"][:20])
    result = run("certify", MODELS / "digits_mlp.onnx", "--data", tmp_path / "d.npz", "--eps",
                 "0.01", "--norm", "inf", "--method", "local")
    assert result.exit_code == 0, result.output
    assert "float32" in result.output and "capped" in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_long_lipsdp_runs_report_their_stages(wide_relu):
    import lipcert

    graph = lipcert.load(wide_relu)
    seen: list[str] = []
    res = lipcert.bound(graph, "lipsdp", "2", form="eclipse-fast", progress=seen.append)
    assert res.upper is not None
    steps = [t for t in seen if t.startswith("ECLipsE-Fast scale search")]
    n = len(steps)  # the bracketing's count is known once the bracket is
    assert n > 10 and " 1/" in steps[0] and f" {n}/{n}" in steps[-1]
    assert all(f" {k + 1}/" in t for k, t in enumerate(steps))
    assert any(t.startswith("checking the certificate") for t in seen)
    assert "soundness self-check" in seen
    seen.clear()
    lipcert.bound(graph, "lipsdp", "2", solver="scs", progress=seen.append)
    assert any(t.startswith("SCS on the LMI") for t in seen)
    assert any(t.startswith("checking the certificate") for t in seen)


@pytest.mark.parametrize("method,norm", [("lower", "2"), ("exact", "inf")])
def test_certify_refuses_estimates_with_the_reason(method, norm):
    result = run("certify", MODELS / "digits_mlp.onnx", "--data", MODELS / "digits_test.npz",
                 "--eps", "0.01", "--method", method, "--norm", norm)
    assert result.exit_code == 2
    assert "cannot certify" in result.output and "estimate" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_top_level_help_is_not_cut():
    result = run("--help")
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1]
    assert "..." not in commands and all(c in commands for c in
                                         ("bound", "certify", "compare", "inspect", "methods"))


def test_lower_values_that_are_not_finite_positive_numbers_are_not_used():
    from lipcert.compare import best_lower, compare_payload_rows
    from lipcert.estimators.base import Bound

    lower = Bound("lower", "inf", None, lower=float("nan"), sound=False)
    results = [Bound("local", "inf", 5.0, lower=float("inf"), scope="box",
                     region={"describe": "b"}),
               Bound("naive", "inf", 9.0, lower=-1.0)]
    assert best_lower(results, lower, False) is None
    assert all(row["ratio"] is None for row in compare_payload_rows(results, lower, False))
