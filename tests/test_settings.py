"""Typed method settings: unknown keys and bad values are refused (exit 2 / InputError)
naming the key, from the CLI, the TOML configs and the Python API; configs/default.toml
agrees with the settings dataclasses (the one source of truth for defaults)."""

from __future__ import annotations

import tomllib
from dataclasses import fields

import pytest
from click.testing import CliRunner
from helpers import MODELS, ROOT

import lipcert
from lipcert.cli import cli
from lipcert.errors import InputError
from lipcert.estimators import REGISTRY, load_all

load_all()
MLP = MODELS / "digits_mlp.onnx"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _bad_values(f) -> list:
    kind = str(f.type).split(" | ")[0]
    if kind == "int":
        return ["abc", 1.5, -1] if f.metadata.get("minimum") is not None else ["abc", 1.5]
    if kind == "float":
        return ["abc", float("nan")] + ([-1.0] if f.metadata.get("minimum") is not None else [])
    if f.metadata.get("choices"):
        return ["no-such-choice", 3]
    return [3]


SETTINGS = [(name, f) for name, est in sorted(REGISTRY.items())
            for f in fields(est.settings)]


@pytest.mark.parametrize("method,f", SETTINGS, ids=[f"{m}.{f.name}" for m, f in SETTINGS])
def test_each_setting_refuses_bad_values_by_name(method, f):
    est = REGISTRY[method]
    for bad in _bad_values(f):
        with pytest.raises(InputError, match=f.name):
            est.parse_settings({f.name: bad})
    default = getattr(est.settings(), f.name)
    if default is not None:
        assert getattr(est.parse_settings({f.name: default}), f.name) == default


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_unknown_keys_are_refused_and_valid_ones_listed(method):
    est = REGISTRY[method]
    with pytest.raises(InputError, match="iteratons") as info:
        est.parse_settings({"iteratons": 3})
    for f in fields(est.settings):
        assert f.name in str(info.value)


def test_python_api_refuses_a_misspelled_key():
    graph = lipcert.load(MLP)
    with pytest.raises(InputError, match="iteratons"):
        lipcert.bound(graph, "gram", "2", iteratons=1)
    assert lipcert.bound(graph, "gram", "2", iterations=3).details["iterations"] == 3


@pytest.mark.parametrize("args,key", [
    (("-m", "gram", "-o", "iterations=abc"), "iterations"),
    (("-m", "gram", "-o", "iteratons=3"), "iteratons"),
    (("-m", "lipsdp", "-o", "time_limit=-1"), "time_limit"),
    (("-m", "local", "-n", "inf", "-o", "batch=0"), "batch"),
])
def test_cli_refuses_bad_options(args, key):
    result = run("bound", MLP, *args)
    assert result.exit_code == 2 and key in result.output, result.output


def test_toml_method_table_with_an_unknown_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[methods.gram]\niteratons = 3\n")
    result = run("compare", MLP, "--methods", "naive", "--config", cfg)
    assert result.exit_code == 2 and "iteratons" in result.output
    cfg.write_text(f'[certify]\nmodel = "{MLP}"\ndata = "{MODELS / "digits_test.npz"}"\n'
                   'eps = 0.1\nmethod = "gram"\n[methods.gram]\niterations = "many"\n')
    result = run("certify", "--config", cfg)
    assert result.exit_code == 2 and "iterations" in result.output


def test_compare_refuses_an_unknown_method():
    result = run("compare", MLP, "--methods", "foo,naive")
    assert result.exit_code == 2 and "foo" in result.output


def test_default_toml_matches_the_settings_dataclasses():
    cfg = tomllib.loads((ROOT / "configs" / "default.toml").read_text())
    for name, table in cfg["methods"].items():
        est = REGISTRY[name]
        defaults = {f.name: getattr(est.settings(), f.name) for f in fields(est.settings)}
        for key, value in table.items():
            assert key in defaults, (name, key)
            assert value == defaults[key], (name, key, value, defaults[key])
        listed = {k for k, v in defaults.items() if v is not None}
        assert set(table) == listed, (name, listed - set(table))
    assert set(cfg["methods"]) == {n for n, e in REGISTRY.items() if fields(e.settings)}
