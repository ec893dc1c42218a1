"""Importer: every supported op reproduces onnxruntime (the fidelity check is the oracle),
patterns are recognised, unsupported ops are all named, bad files give one clear error."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from helpers import export
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import lipcert
from lipcert.errors import InputError, ModelRefused, UnsupportedOpsError
from lipcert.ir import ops as O


class MaxMin(nn.Module):
    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class GroupSort(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.g = g

    def forward(self, x):
        return x.reshape(1, -1, self.g).sort(dim=-1, descending=True).values.reshape(x.shape)


class Normalise(nn.Module):
    def forward(self, x):
        return (x - 0.25) / 0.5


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.relu(self.a(x)) + self.b(x) - 0.5 * x


class ColumnMatMul(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 4))

    def forward(self, x):  # x: (4, 1); weight on the left
        return torch.tanh(self.w @ x)


IMAGE = (1, 3, 9, 9)
CASES = {
    "conv_stride_dilation_groups": (nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=2, dilation=2), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.LeakyReLU(0.2)), IMAGE),
    "conv_transpose_bn": (nn.Sequential(
        nn.ConvTranspose2d(3, 4, 4, stride=2, padding=1, output_padding=1),
        nn.BatchNorm2d(4), nn.Sigmoid()), IMAGE),
    "pools_and_pad": (nn.Sequential(
        nn.ZeroPad2d((1, 0, 2, 1)), nn.MaxPool2d(3, stride=2, padding=1), nn.ReLU(),
        nn.AvgPool2d(2, stride=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)),
        IMAGE),
    "avgpool_exclude_pad_ceil": (nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True,
                                              count_include_pad=False), IMAGE),
    "mlp_softmax_tanh": (nn.Sequential(nn.Flatten(), nn.Linear(243, 16), nn.Tanh(),
                                       nn.Linear(16, 5), nn.Softmax(dim=1)), IMAGE),
    "normalise_bn1d": (nn.Sequential(Normalise(), nn.Flatten(), nn.Linear(243, 8),
                                     nn.BatchNorm1d(8), nn.ReLU6(), nn.Linear(8, 3)), IMAGE),
    "maxmin": (nn.Sequential(nn.Linear(6, 8), MaxMin(), nn.Linear(8, 2)), (1, 6)),
    "groupsort": (nn.Sequential(nn.Linear(6, 9), GroupSort(3), nn.Linear(9, 2)), (1, 6)),
    "residual": (Residual(), IMAGE),
    "column_matmul": (ColumnMatMul(), (4, 1)),
    "conv1d": (nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU()), (1, 2, 7)),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_import_matches_onnxruntime(name, dynamo, tmp_path):
    torch.manual_seed(0)
    module, shape = CASES[name]
    for m in module.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    try:
        path = export(module, torch.randn(shape), tmp_path / "m.onnx", opset=18, dynamo=dynamo)
    except Exception as exc:  # an exporter limitation, not ours
        pytest.skip(f"torch cannot export this case: {type(exc).__name__}")
    graph = lipcert.load(path)  # raises ModelRefused on any disagreement with onnxruntime
    assert graph.meta["fidelity"]["samples"] > 0
    assert graph.input_shape == shape


def test_maxmin_and_groupsort_become_groupsort_nodes(tmp_path):
    for name in ("maxmin", "groupsort"):
        module, shape = CASES[name]
        graph = lipcert.load(export(module, torch.randn(shape), tmp_path / f"{name}.onnx"))
        kinds = [n.op.kind for n in graph.nodes]
        assert "GroupSort" in kinds and "Extremum" not in kinds, kinds


def test_normalisation_and_batchnorm_fold_into_dense(tmp_path):
    module, shape = CASES["normalise_bn1d"]
    graph = lipcert.load(export(module, torch.randn(shape), tmp_path / "n.onnx"))
    assert not any(isinstance(n.op, O.Scale) for n in graph.nodes)


def _model(nodes, inits, in_shape=(1, 2), out_shape=(1, 2), opset=13):
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_every_unsupported_op_is_listed(tmp_path):
    nodes = [helper.make_node("Sin", ["x"], ["a"], name="s1"),
             helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Cos", ["b"], ["c"], name="c1"),
             helper.make_node("Mul", ["c", "x"], ["y"], name="m")]
    path = tmp_path / "u.onnx"
    onnx.save(_model(nodes, {}), path)
    with pytest.raises(UnsupportedOpsError) as info:
        lipcert.load(path)
    message = str(info.value)
    assert "Sin" in message and "Cos" in message and "'s1'" in message and "'c1'" in message


def test_bilinear_mul_is_refused_by_name(tmp_path):
    nodes = [helper.make_node("Mul", ["x", "x"], ["y"], name="square")]
    onnx.save(_model(nodes, {}), tmp_path / "sq.onnx")
    with pytest.raises(UnsupportedOpsError, match="square"):
        lipcert.load(tmp_path / "sq.onnx")


def test_nan_weights_are_an_input_error(tmp_path):
    w = np.array([[1.0, np.nan], [0.0, 1.0]])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    onnx.save(_model(nodes, {"w": w}), tmp_path / "nan.onnx")
    with pytest.raises(InputError, match="NaN"):
        lipcert.load(tmp_path / "nan.onnx")


def test_disagreeing_import_is_refused(tmp_path, monkeypatch):
    from lipcert.ir import evaluate

    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    onnx.save(_model(nodes, {}), tmp_path / "r.onnx")
    monkeypatch.setitem(evaluate.FORWARD, O.Relu, lambda op, x: torch.tanh(x))
    with pytest.raises(ModelRefused, match="disagrees with onnxruntime"):
        lipcert.load(tmp_path / "r.onnx")
    graph = lipcert.load(tmp_path / "r.onnx", verify=False)
    assert any("NOT checked" in n for n in graph.notes)


@pytest.mark.parametrize("content,match", [
    (None, "no such file"),
    (b"", "empty"),
    (b"this is not an onnx file at all \x00\xff", "not a readable ONNX model|empty"),
])
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=match):
        lipcert.load(path)


def test_truncated_and_empty_graph(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    data = _model(nodes, {}).SerializeToString()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        lipcert.load(tmp_path / "t.onnx")
    empty = helper.make_model(helper.make_graph(
        [], "e", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])]))
    onnx.save(empty, tmp_path / "e.onnx")
    with pytest.raises(InputError, match="empty"):
        lipcert.load(tmp_path / "e.onnx")


def test_external_data_outside_model_folder_is_refused(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = _model(nodes, {"w": np.eye(2)})
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    onnx.save(model, tmp_path / "ext.onnx")
    with pytest.raises(InputError, match="outside the model's folder"):
        lipcert.load(tmp_path / "ext.onnx")


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("slope", [0.25, -0.5, 3.0])
def test_prelu_with_one_slope_is_leaky_relu_and_bounded_soundly(slope, dynamo, tmp_path):
    from helpers import sampled_gradient_lower

    torch.manual_seed(4)
    act = nn.PReLU()
    act.weight.data.fill_(slope)
    module = nn.Sequential(nn.Linear(6, 12), act, nn.Linear(12, 3))
    graph = lipcert.load(export(module, torch.randn(1, 6), tmp_path / "p.onnx",
                                dynamo=dynamo))
    leaky = [n.op for n in graph.nodes if isinstance(n.op, O.LeakyRelu)]
    assert len(leaky) == 1 and leaky[0].alpha == pytest.approx(slope, rel=1e-7)
    for norm in ("2", "inf"):
        lower = sampled_gradient_lower(graph, norm, samples=64)
        for method in ("naive", "lipsdp"):
            upper = lipcert.bound(graph, method, norm).upper
            assert upper is not None and upper >= lower * (1 - 1e-9), (method, norm)


def test_prelu_with_a_slope_per_channel_is_refused_by_name(tmp_path):
    module = nn.Sequential(nn.Linear(6, 4), nn.PReLU(4), nn.Linear(4, 2))
    path = export(module, torch.randn(1, 6), tmp_path / "pc.onnx")
    with pytest.raises(UnsupportedOpsError, match=r"PRelu.*4 slopes"):
        lipcert.load(path)


def test_prelu_slope_keeps_a_double_models_precision(tmp_path):
    # 0.1 is not a float32 number: a float64 model's slope must not be rounded to one
    # (onnxruntime's CPU provider has no double PRelu, so the check is skipped here)
    w = np.array([[1.0, -2.0], [0.5, 1.5]])
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("PRelu", ["h", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 2])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([0.1]), "s")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]),
              tmp_path / "d.onnx")
    graph = lipcert.load(tmp_path / "d.onnx", verify=False)
    (alpha,) = [n.op.alpha for n in graph.nodes if isinstance(n.op, O.LeakyRelu)]
    assert alpha == 0.1
