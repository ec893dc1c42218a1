"""The command line: output, JSON shape, exit codes (0 ok, 2 bad input), no tracebacks."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import MODELS

from lipcert.cli import cli

BUNDLED = sorted(p.name for p in MODELS.glob("*.onnx"))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("model", BUNDLED)
def test_bound_json_shape(model):
    result = run("bound", MODELS / model, "--json", "-", "--norm", "inf")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert len(payload["model"]["sha256"]) == 64
    (row,) = payload["results"]
    assert {"method", "norm", "upper", "sound", "time_s", "notes"} <= set(row)
    assert row["method"] == "naive" and row["norm"] == "inf" and row["sound"] is True
    assert row["upper"] > 0


def test_bound_table_and_inspect_and_methods(tmp_path):
    result = run("bound", MODELS / "digits_mlp.onnx")
    assert result.exit_code == 0 and "naive" in result.output
    out = tmp_path / "r.json"
    assert run("bound", MODELS / "digits_cnn.onnx", "--json", out).exit_code == 0
    assert json.loads(out.read_text())["results"][0]["upper"] > 0
    result = run("inspect", MODELS / "digits_maxmin.onnx")
    assert result.exit_code == 0 and "GroupSort" in result.output
    result = run("methods")
    assert result.exit_code == 0 and "naive" in result.output and "Conv" in result.output


def test_no_verify_is_reported():
    result = run("bound", MODELS / "digits_mlp.onnx", "--no-verify", "--json", "-")
    payload = json.loads(result.stdout[result.stdout.index("{"):])
    assert any("NOT checked" in n for n in payload["results"][0]["notes"])


@pytest.mark.parametrize("args", [
    ("bound", "missing.onnx"),
    ("bound", "{bad}"),
    ("bound", "{bundled}", "--method", "nope"),
    ("bound", "{bundled}", "--norm", "3"),
])
def test_bad_input_exit_code_2_without_traceback(tmp_path, args):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage")
    args = [a.format(bad=bad, bundled=MODELS / "digits_mlp.onnx") for a in args]
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


def test_help_lists_every_method():
    from lipcert.estimators import REGISTRY, load_all

    load_all()
    text = " ".join(run("bound", "--help").output.split())
    for name in REGISTRY:
        assert name in text, name
    assert "global bounding method" not in run("certify", "--help").output


@pytest.mark.parametrize("norm,expected", [("2", ["naive", "gram", "lipsdp"]),
                                           ("inf", ["naive", "lipsdp", "local", "exact"])])
def test_compare_defaults_follow_the_norm(norm, expected):
    from lipcert.compare import default_methods

    assert default_methods(norm) == expected


def test_compare_empty_method_list_is_refused():
    result = run("compare", MODELS / "digits_mlp.onnx", "--methods", ",")
    assert result.exit_code == 2 and "--methods" in result.stderr
