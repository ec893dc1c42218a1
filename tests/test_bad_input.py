"""One pinned case per class of bad input found by the hostile-user audit: each ends in
exit 2 with one line naming what is wrong (never exit 3, a traceback or a hang)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from fuzzing import assert_contract, run_cli
from helpers import MODELS
from onnx import TensorProto, helper, numpy_helper

MLP = MODELS / "digits_mlp.onnx"
DATA = MODELS / "digits_test.npz"


def _save(tmp_path, name, nodes, inits=(), shape=(1, 4), opset=17):
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, list(shape))], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    return path


def _f(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _i(name, a):
    return numpy_helper.from_array(np.asarray(a, np.int64), name)


n = helper.make_node
MALFORMED = {
    "gemm bias of the wrong length": (
        [n("Gemm", ["x", "W", "b"], ["y"], transB=1)], [_f("W", np.eye(4)), _f("b", np.ones(3))],
        "Gemm"),
    "add bias of the wrong length": (
        [n("MatMul", ["x", "W"], ["h"]), n("Add", ["h", "b"], ["y"])],
        [_f("W", np.eye(4)), _f("b", np.ones(3))], "Add"),
    "two nodes write one value": (
        [n("Relu", ["x"], ["h"]), n("Sigmoid", ["x"], ["h"]), n("Relu", ["h"], ["y"])], [],
        "writes the value 'h'"),
    "a node overwrites a folded constant": (
        [n("Constant", [], ["c"], value=_f("cv", np.ones(4))), n("Relu", ["x"], ["c"]),
         n("Add", ["x", "c"], ["y"])], [], "writes the value 'c'"),
    "constant without a value": (
        [n("Constant", [], ["c"]), n("Add", ["x", "c"], ["y"])], [], "Constant"),
    "node without outputs": ([n("Relu", ["x"], []), n("Relu", ["x"], ["y"])], [], "no outputs"),
    "slice step 0": (
        [n("Slice", ["x", "s", "e", "a", "st"], ["y"])],
        [_i("s", [0]), _i("e", [4]), _i("a", [1]), _i("st", [0])], "step"),
    "conv weight channels": (
        [n("Conv", ["x", "w"], ["y"])], [_f("w", np.ones((2, 3, 3, 3)))], "Conv"),
    "gather index out of range": (
        [n("Gather", ["x", "i"], ["y"], axis=1)], [_i("i", [0, 9])], "Gather"),
    "reads a value nobody wrote": ([n("Relu", ["h"], ["y"])], [], "no earlier node"),
    "rich markup in names": (
        [n("Foo[/bold red]", ["x"], ["y"], name="[/bold red]n")], [], "[/bold red]"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_graphs_name_the_node(tmp_path, case):
    nodes, inits, expected = MALFORMED[case]
    shape = (1, 1, 5, 5) if "conv" in case else (1, 4)
    out = run_cli(["bound", _save(tmp_path, "m", nodes, inits, shape)])
    assert out.exit_code == 2, out.describe()
    assert_contract(out)
    assert expected in out.stderr, out.describe()


def test_huge_input_dim_is_refused_without_allocating(tmp_path):
    path = _save(tmp_path, "huge", [n("Relu", ["x"], ["y"])], shape=(1, 2**31))
    out = run_cli(["bound", path])
    assert out.exit_code == 2 and "LIPCERT_MAX_VALUE_ELEMENTS" in out.stderr, out.describe()


def test_huge_intermediate_tensor_is_refused(tmp_path):
    pads = _i("p", [0, 0, 0, 2**28])
    path = _save(tmp_path, "pad", [n("Pad", ["x", "p"], ["y"])], [pads])
    out = run_cli(["bound", path])
    assert out.exit_code == 2 and "LIPCERT_MAX_VALUE_ELEMENTS" in out.stderr, out.describe()


def test_onnxruntime_errors_are_one_line(tmp_path):
    split = _i("sp", [1, 1])
    path = _save(tmp_path, "split", [n("Split", ["x", "sp"], ["a", "b"], axis=1),
                                     n("Concat", ["a", "b"], ["y"], axis=1)], [split])
    out = run_cli(["bound", path])
    assert out.exit_code == 2 and "onnxruntime" in out.stderr, out.describe()
    assert_contract(out)


@pytest.mark.parametrize("flag", ["--json", "--junit"])
@pytest.mark.parametrize("where", ["missing_folder", "directory", "proc"])
def test_unwritable_outputs_fail_before_any_work(tmp_path, flag, where, monkeypatch):
    target = {"missing_folder": tmp_path / "no" / "out", "directory": tmp_path,
              "proc": "/proc/lipcert-out"}[where]
    import lipcert.onnx_import as importer

    def never(*a, **k):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(importer, "load", never)
    command = ["bound", MLP] if flag == "--json" else ["certify", MLP, "--data", DATA,
                                                       "--eps", "0.01"]
    out = run_cli([*command, flag, target])
    assert out.exit_code == 2 and flag in out.stderr, out.describe()


@pytest.mark.parametrize("flag,target", [("--markdown", "DIR"), ("--plot", "/no/such/p.png"),
                                         ("--plot", "out.xyz")])
def test_compare_outputs_checked_first(tmp_path, flag, target):
    out = run_cli(["compare", MLP, "--methods", "naive", flag,
                   tmp_path if target == "DIR" else target])
    assert out.exit_code == 2 and flag in out.stderr, out.describe()


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case", ["scalar_x", "string_labels", "labels_out_of_range",
                                  "length_mismatch", "complex_x", "float_labels"])
def test_bad_data_classes(tmp_path, case):
    d = np.load(DATA)
    x, y = d["x"][:6], d["y"][:6]
    arrays = {"scalar_x": dict(x=np.float32(1.0), y=y),
              "string_labels": dict(x=x, y=np.array(["a"] * 6)),
              "labels_out_of_range": dict(x=x, y=np.array([0, 1, 2, 3, 4, 10])),
              "length_mismatch": dict(x=x, y=y[:5]),
              "complex_x": dict(x=x.astype(np.complex64), y=y),
              "float_labels": dict(x=x, y=y + 0.5)}[case]
    out = run_cli(["certify", MLP, "--data", _npz(tmp_path, **arrays), "--eps", "0.01"])
    assert out.exit_code == 2, out.describe()
    assert_contract(out)


@pytest.mark.parametrize("args,expected", [
    (["--index", "999"], "--index 999"),
    ([], "--index K"),
])
def test_input_index_is_checked(args, expected):
    out = run_cli(["bound", MLP, "-m", "local", "-n", "inf", "--input", DATA, "--eps", "0.01",
                   *args])
    assert out.exit_code == 2 and expected in out.stderr, out.describe()


CONFIGS = {
    "report_eps scalar": ("[certify]\nreport_eps = 0.1\n", "report_eps"),
    "model a number": ("[certify]\nmodel = 5\n", "model"),
    "options a string": ('[certify]\noptions = "abc"\n', "options"),
    "gate a string": ('[certify]\nmin_certified_accuracy = "high"\n', "min_certified_accuracy"),
    "section a value": ("certify = 3\n", "certify"),
    "methods a value": ("[methods]\ngram = 3\n", "methods.gram"),
}


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_config_types(tmp_path, case):
    text, expected = CONFIGS[case]
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    out = run_cli(["certify", "--config", cfg, MLP, "--data", DATA, "--eps", "0.01"])
    assert out.exit_code == 2 and expected in out.stderr, out.describe()


def test_config_binary_and_directory(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(bytes(range(256)))
    for path in (cfg, tmp_path):
        out = run_cli(["compare", "--config", path, MLP])
        assert out.exit_code == 2, out.describe()
        assert_contract(out)


def test_config_methods_string_is_a_list(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[compare]\nmethods = "naive"\n')
    out = run_cli(["compare", "--config", cfg, MLP, "--json", "-", "--timeout", "60"])
    assert out.exit_code == 0, out.describe()
    assert [r["method"] for r in out.json()["results"]] == ["naive"]


@pytest.mark.parametrize("args,expected", [
    (["bound", MLP, "--device", "meta"], "--device"),
    (["bound", MLP, "-m", "local", "-n", "inf", "--domain", "0,inf"], "domain"),
    (["certify", MLP, "--data", DATA, "--eps", "0.01", "--report-eps", "nan,inf,-1"],
     "--report-eps"),
    (["compare", MLP, "--methods", "naive", "--timeout", "-1"], "--timeout"),
    (["compare", MLP, "--methods", "naive", "--timeout", "nan"], "--timeout"),
    (["bound", MLP, "-m", "local", "-n", "inf", "--input", DATA, "--index", "0", "--eps",
      "nan"], "eps"),
    # run-context keys of the Python API are not -o settings (were internal errors)
    (["bound", MLP, "-m", "local", "-n", "inf", "--input", DATA, "--index", "0", "--eps",
      "0.01", "-o", "targets=1"], "targets is not a method setting"),
    (["bound", MLP, "-m", "local", "-n", "inf", "--input", DATA, "--index", "0", "--eps",
      "0.01", "-o", "queries=1"], "queries is not a method setting"),
    (["bound", MLP, "-o", "eps=0.1"], "--eps"),
])
def test_bad_options(args, expected):
    out = run_cli(args)
    assert out.exit_code == 2 and expected in out.stderr, out.describe()
    assert_contract(out)


def test_long_chain_imports(tmp_path):
    """A 20,000-node chain imports (the passes used to rescan the node list per node)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from import_scale import relu_chain, residual_chain

    import lipcert

    for name, model in (("relu", relu_chain(20_000)), ("residual", residual_chain(2_000))):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        graph = lipcert.load(path, verify=False)
        assert len(graph) == len(model.graph.node)
