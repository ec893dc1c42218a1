"""The fuzz suite's machinery: small seed models, mutations of ONNX models, data files and
configs, an in-process CLI run with a hang limit, and the independent checks every outcome
must pass.

The contract (README, "What lipcert refuses"): every run ends in exit 0 with a bound at least
a sampled lower bound of what onnxruntime computes, exit 1 only for a failed gate, or exit 2
with one line and no traceback, within ``HANG_LIMIT_S`` seconds.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import onnx
from click.testing import CliRunner
from helpers import MODELS
from onnx import TensorProto, helper, numpy_helper

from lipcert.cli import cli

HANG_LIMIT_S = 120  # a hang detector, not a performance assertion
SPECIAL = [float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-45, 0.0, -1.0, 1e30]


def examples(default: int) -> int:
    """Examples per fuzz test: LIPCERT_FUZZ_EXAMPLES scales the CI default (see README)."""
    raw = os.environ.get("LIPCERT_FUZZ_EXAMPLES")
    return default if raw is None else max(1, int(raw) * default // 100)


# -- seed models ------------------------------------------------------------------------
def _init(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def _model(nodes, inits, in_shape, out_shape, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "seed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def seed_mlp(rng) -> onnx.ModelProto:
    n = helper.make_node
    return _model(
        [n("Gemm", ["x", "w1", "b1"], ["h"], transB=1), n("Relu", ["h"], ["r"]),
         n("Gemm", ["r", "w2", "b2"], ["y"], transB=1)],
        [_init("w1", rng.standard_normal((8, 4))), _init("b1", rng.standard_normal(8)),
         _init("w2", rng.standard_normal((3, 8))), _init("b2", rng.standard_normal(3))],
        (1, 4), (1, 3))


def seed_conv(rng) -> onnx.ModelProto:
    n = helper.make_node
    return _model(
        [n("Conv", ["x", "k", "kb"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1]),
         n("BatchNormalization", ["c", "s", "t", "m", "v"], ["bn"], epsilon=1e-5),
         n("LeakyRelu", ["bn"], ["a"], alpha=0.1),
         n("MaxPool", ["a"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
         n("Flatten", ["p"], ["f"], axis=1), n("Gemm", ["f", "w"], ["y"], transB=1)],
        [_init("k", rng.standard_normal((2, 1, 3, 3))), _init("kb", rng.standard_normal(2)),
         _init("s", rng.uniform(0.5, 2, 2)), _init("t", rng.standard_normal(2)),
         _init("m", rng.standard_normal(2)), _init("v", rng.uniform(0.5, 2, 2)),
         _init("w", rng.standard_normal((3, 18)))],
        (1, 1, 6, 6), (1, 3))


def seed_residual(rng) -> onnx.ModelProto:
    n = helper.make_node
    return _model(
        [n("MatMul", ["x", "a"], ["h"]), n("Add", ["h", "ab"], ["hb"]), n("Tanh", ["hb"], ["t"]),
         n("MatMul", ["t", "b"], ["g"]), n("Add", ["x", "g"], ["z"]),
         n("Clip", ["z", "lo", "hi"], ["c"]), n("Sigmoid", ["c"], ["s"]),
         n("MatMul", ["s", "o"], ["y"])],
        [_init("a", rng.standard_normal((4, 6))), _init("ab", rng.standard_normal(6)),
         _init("b", rng.standard_normal((6, 4)) * 0.3), _init("lo", -1.0), _init("hi", 2.0),
         _init("o", rng.standard_normal((4, 3)))],
        (1, 4), (1, 3))


def seed_maxmin(rng) -> onnx.ModelProto:
    n = helper.make_node
    split = numpy_helper.from_array(np.array([3, 3], np.int64), "split")
    return _model(
        [n("Gemm", ["x", "w1"], ["h"], transB=1), n("Split", ["h", "split"], ["l", "r"], axis=1),
         n("Max", ["l", "r"], ["mx"]), n("Min", ["l", "r"], ["mn"]),
         n("Concat", ["mx", "mn"], ["c"], axis=1), n("Gemm", ["c", "w2"], ["y"], transB=1)],
        [_init("w1", rng.standard_normal((6, 4))), split,
         _init("w2", rng.standard_normal((3, 6)))],
        (1, 4), (1, 3))


SEEDS: dict[str, Callable] = {"mlp": seed_mlp, "conv": seed_conv, "residual": seed_residual,
                              "maxmin": seed_maxmin}
REAL = ["digits_mlp.onnx", "digits_maxmin.onnx"]  # torch exports, bundled


def seed_model(name: str, seed: int = 0) -> onnx.ModelProto:
    if name in SEEDS:
        return SEEDS[name](np.random.default_rng(seed))
    return onnx.load(str(MODELS / name))


# -- mutations of a ModelProto ------------------------------------------------------------
OP_TYPES = ["Relu", "Sigmoid", "Tanh", "Gemm", "MatMul", "Add", "Sub", "Mul", "Div", "Conv",
            "MaxPool", "Flatten", "Reshape", "Concat", "Identity", "Softmax", "Cast", "Floor",
            "Abs", "Exp", "Log", "Where", "Resize", "LSTM", "Loop", "If", "Max", "Min", "TopK",
            "ReduceMax", "Pad", "Transpose", "Gather", "Slice", "[/bold red]Bad"]
INT_ATTRS = ["axis", "transA", "transB", "group", "keepdims", "to", "k", "ceil_mode"]
INTS_ATTRS = ["pads", "strides", "kernel_shape", "dilations", "perm", "axes", "output_padding"]
FLOAT_ATTRS = ["alpha", "beta", "epsilon", "min", "max", "momentum"]
INT_VALUES = [-(2**31), -5, -1, 0, 1, 2, 3, 7, 2**31 - 1, 2**40]
DTYPES = [np.float64, np.float16, np.int64, np.int32, np.bool_, np.uint8]


def _values(model: onnx.ModelProto) -> list[str]:
    g = model.graph
    names = [i.name for i in g.input] + [t.name for t in g.initializer]
    names += [o for node in g.node for o in node.output]
    return names + ["", "nowhere"]


def _pick(draw, seq, label: str):
    return draw(st.sampled_from(list(seq)), label=label) if len(seq) else None


def _index(draw, n: int, label: str) -> int | None:
    return draw(st.integers(0, n - 1), label=label) if n else None


def _drop_one(items, draw, label: str) -> None:
    i = _index(draw, len(items), label)
    if i is not None:
        del items[i]


def m_drop_node(m, draw):
    _drop_one(m.graph.node, draw, "node")


def m_duplicate_node(m, draw):
    i = _index(draw, len(m.graph.node), "node")
    if i is not None:
        j = _index(draw, len(m.graph.node) + 1, "at")
        m.graph.node.insert(j, copy.deepcopy(m.graph.node[i]))


def m_swap_nodes(m, draw):
    i, j = _index(draw, len(m.graph.node), "i"), _index(draw, len(m.graph.node), "j")
    if i is not None and i != j:
        a, b = copy.deepcopy(m.graph.node[i]), copy.deepcopy(m.graph.node[j])
        m.graph.node[i].CopyFrom(b)
        m.graph.node[j].CopyFrom(a)


def m_rewire(m, draw):
    i = _index(draw, len(m.graph.node), "node")
    if i is None:
        return
    node = m.graph.node[i]
    field = node.output if draw(st.booleans(), label="outputs") else node.input
    k = _index(draw, len(field) + 1, "slot")
    value = _pick(draw, _values(m), "value")
    if k == len(field):
        field.append(value)
    else:
        field[k] = value


def m_drop_initializer(m, draw):
    _drop_one(m.graph.initializer, draw, "init")


def _init_array(m, draw):
    i = _index(draw, len(m.graph.initializer), "init")
    if i is None:
        return None, None
    return m.graph.initializer[i], numpy_helper.to_array(m.graph.initializer[i])


def m_poison_initializer(m, draw):
    t, a = _init_array(m, draw)
    if t is None or a.size == 0 or not np.issubdtype(a.dtype, np.floating):
        return
    a = a.copy().reshape(-1)
    a[_index(draw, a.size, "pos")] = _pick(draw, SPECIAL, "special")
    t.CopyFrom(numpy_helper.from_array(a.reshape(t.dims), t.name))


def m_reshape_initializer(m, draw):
    t, a = _init_array(m, draw)
    if t is None:
        return
    dims = draw(st.lists(st.integers(0, 9), max_size=4), label="dims")
    size = int(np.prod(dims)) if dims else 1
    flat = np.resize(a.reshape(-1), size) if a.size else np.zeros(size, a.dtype)
    t.CopyFrom(numpy_helper.from_array(flat.reshape(dims), t.name))


def m_retype_initializer(m, draw):
    t, a = _init_array(m, draw)
    if t is not None:
        dtype = _pick(draw, DTYPES, "dtype")
        with np.errstate(all="ignore"):
            t.CopyFrom(numpy_helper.from_array(a.astype(dtype), t.name))


def m_attribute(m, draw):
    i = _index(draw, len(m.graph.node), "node")
    if i is None:
        return
    node = m.graph.node[i]
    kind = draw(st.sampled_from(["int", "ints", "float", "drop"]), label="kind")
    if kind == "drop":
        k = _index(draw, len(node.attribute), "attr")
        if k is not None:
            del node.attribute[k]
        return
    if kind == "int":
        name, value = _pick(draw, INT_ATTRS, "name"), _pick(draw, INT_VALUES, "value")
    elif kind == "ints":
        name = _pick(draw, INTS_ATTRS, "name")
        value = draw(st.lists(st.sampled_from(INT_VALUES[1:8]), max_size=5), label="values")
    else:
        name, value = _pick(draw, FLOAT_ATTRS, "name"), _pick(draw, SPECIAL, "value")
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    attr_type = onnx.AttributeProto.INTS if kind == "ints" else None
    node.attribute.extend(kept + [helper.make_attribute(name, value, attr_type=attr_type)])


def m_op_type(m, draw):
    i = _index(draw, len(m.graph.node), "node")
    if i is not None:
        m.graph.node[i].op_type = _pick(draw, OP_TYPES, "op")


def m_opset(m, draw):
    m.opset_import[0].version = draw(st.integers(1, 30), label="opset")


def m_input_shape(m, draw):
    dims = m.graph.input[0].type.tensor_type.shape.dim
    k = _index(draw, len(dims), "dim")
    choice = draw(st.sampled_from(["value", "param", "drop", "add"]), label="how")
    if choice == "value" and k is not None:
        dims[k].dim_value = _pick(draw, [0, 2, 3, 5, 2**31, 2**40], "size")
    elif choice == "param" and k is not None:
        dims[k].dim_param = "batch"
    elif choice == "drop" and k is not None:
        del dims[k]
    else:
        dims.add().dim_value = _pick(draw, [1, 2, 3], "size")


def m_io(m, draw):
    choice = draw(st.sampled_from(["out_name", "out_extra", "in_type", "in_extra", "no_out"]),
                  label="io")
    g = m.graph
    if choice == "out_name" and len(g.output):
        g.output[0].name = _pick(draw, _values(m), "value")
    elif choice in ("out_extra", "out_name"):
        g.output.append(helper.make_tensor_value_info(_pick(draw, _values(m), "v"),
                                                      TensorProto.FLOAT, None))
    elif choice == "in_type":
        g.input[0].type.tensor_type.elem_type = _pick(
            draw, [TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.INT64,
                   TensorProto.STRING, TensorProto.BOOL], "type")
    elif choice == "in_extra":
        g.input.append(helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 4]))
    else:
        del g.output[:]


MUTATIONS = [m_drop_node, m_duplicate_node, m_swap_nodes, m_rewire, m_drop_initializer,
             m_poison_initializer, m_reshape_initializer, m_retype_initializer, m_attribute,
             m_attribute, m_op_type, m_opset, m_input_shape, m_io]


def mutate_bytes(data: bytes, draw) -> bytes:
    how = draw(st.sampled_from(["none", "none", "none", "truncate", "flip", "append"]),
               label="bytes")
    if how == "truncate":
        return data[: draw(st.integers(0, len(data)), label="cut")]
    if how == "flip":
        buf = bytearray(data)
        for _ in range(draw(st.integers(1, 8), label="flips")):
            buf[draw(st.integers(0, len(buf) - 1))] ^= 1 << draw(st.integers(0, 7))
        return bytes(buf)
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=64), label="garbage")
    return data


# -- running the CLI in-process -----------------------------------------------------------
class Hang(Exception):
    pass


@contextmanager
def hang_limit(seconds: int = HANG_LIMIT_S):
    def on_alarm(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    args: list[str]
    exit_code: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (f"lipcert {' '.join(self.args)} -> exit {self.exit_code}\nstdout: "
                f"{self.stdout[-1500:]}\nstderr: {self.stderr[-1500:]}")

    def json(self) -> dict:
        return json.loads(self.stdout[self.stdout.index("{"):])


def run_cli(args: list[str]) -> Outcome:
    args = [str(a) for a in args]
    with hang_limit():
        result = CliRunner().invoke(cli, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"lipcert {' '.join(args)} raised\n{tb}")
    return Outcome(args, result.exit_code, result.stdout, result.stderr)


def assert_contract(out: Outcome, allow_gate: bool = False) -> None:
    """Exit 0, exit 1 for a failed gate (when allowed), or exit 2 with exactly one line."""
    allowed = {0, 2} | ({1} if allow_gate else set())
    assert out.exit_code in allowed, out.describe()
    assert "Traceback" not in out.stdout + out.stderr, out.describe()
    if out.exit_code == 2:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(("lipcert: error:", "Usage:", "Error:")) \
            or _is_click_usage(lines), out.describe()
        assert "{" not in out.stdout, out.describe()  # no partial JSON


def _is_click_usage(lines: list[str]) -> bool:
    """click's own usage errors: 'Usage: ...', 'Try ...', 'Error: ...' (one error line)."""
    errors = [line for line in lines if line.startswith("Error:")]
    return len(errors) == 1 and lines[0].startswith("Usage:")


# -- independent truth from onnxruntime -----------------------------------------------------
def ort_lower_bound(model_path: Path, norm: str, box: tuple[np.ndarray, np.ndarray] | None,
                    pairs: int = 48, seed: int = 0) -> tuple[float, float]:
    """(q, slack): the largest secant quotient ||f(x) - f(y)|| / ||x - y|| of onnxruntime's
    own function over random pairs (a true lower bound on its Lipschitz constant, up to
    float rounding), and a rounding slack for comparing a bound with it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(str(model_path), options,
                                   providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    dtype = {"tensor(double)": np.float64, "tensor(float16)": np.float16}.get(spec.type,
                                                                              np.float32)
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
    rng = np.random.default_rng(seed)
    ord_ = 2 if norm == "2" else np.inf
    best, slack = 0.0, 0.0
    unit = float(np.finfo(dtype).eps)
    for k in range(pairs):
        if box is None:
            scale = [0.1, 1.0, 3.0][k % 3]
            x = rng.standard_normal(shape) * scale
            y = x + rng.standard_normal(shape) * scale * [1.0, 0.1][k % 2]
        else:
            lo, hi = (np.broadcast_to(np.asarray(b, np.float64).reshape(-1)
                                      if np.size(b) > 1 else b, (int(np.prod(shape)),))
                      .reshape(shape) for b in box)
            x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
        x, y = x.astype(dtype), y.astype(dtype)
        dx = float(np.linalg.norm((x.astype(np.float64) - y).reshape(-1), ord_))
        if not dx > 0:
            continue
        try:
            fx, fy = (np.asarray(session.run(None, {spec.name: v})[0], np.float64).reshape(-1)
                      for v in (x, y))
        except Exception:
            continue
        if not (np.all(np.isfinite(fx)) and np.all(np.isfinite(fy))):
            continue
        q = float(np.linalg.norm(fx - fy, ord_)) / dx
        noise = 64 * unit * float(max(np.abs(fx).max(initial=0), np.abs(fy).max(initial=0)))
        noise *= math.sqrt(fx.size) / dx
        if q - noise > best - slack:
            best, slack = q, noise
    return best, slack


def assert_bound_sound(out: Outcome, model_path: Path, norm: str,
                       box: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """An exit-0 bound must be a number at least onnxruntime's sampled secant quotient."""
    payload = out.json()
    for row in payload["results"]:
        upper = row["upper"]
        if upper is None or upper == "inf":  # no bound, or a vacuous one
            continue
        assert isinstance(upper, int | float) and math.isfinite(upper) and upper >= 0, \
            out.describe()
        q, slack = ort_lower_bound(model_path, norm, box)
        assert upper * (1 + 1e-6) + slack >= q, (
            f"bound {upper} below onnxruntime's secant quotient {q} (slack {slack})\n"
            + out.describe())
