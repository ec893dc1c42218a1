"""Regressions for the audit's wrong certificates, NaN injection, and the self-check.

Each of the five findings is rebuilt from the same kind of model; every case must end in a
sound bound or no bound (exit 2 for bad models and data), and certify must never certify a
sample that a PGD attack (onnxruntime) flips inside its radius.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from helpers import MODELS, export, sampled_gradient_lower
from onnx import TensorProto, helper, numpy_helper

import lipcert
from lipcert import certify as C
from lipcert.cli import cli
from lipcert.errors import InputError, InternalCheckFailed, ModelRefused, UnsupportedOpsError
from lipcert.estimators.local import relaxations
from lipcert.ir import evaluate
from lipcert.soundness import SITES, inject_nan

DATA = MODELS / "digits_test.npz"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def box_gradient_lower(graph, center, eps, domain=None, samples=400, seed=0) -> float:
    """max ||grad f_j||_1 at random points and corners of the box (a true lower bound)."""
    rng = np.random.default_rng(seed)
    c = np.asarray(center, dtype=np.float64).reshape(-1)
    lo, hi = c - eps, c + eps
    if domain is not None:
        lo, hi = np.maximum(lo, domain[0]), np.minimum(hi, domain[1])
    best = 0.0
    for k in range(samples):
        u = rng.uniform(size=c.size) if k % 2 else (rng.uniform(size=c.size) > 0.5)
        x = torch.as_tensor(lo + u * (hi - lo)).reshape(graph.input_shape)
        jac = torch.autograd.functional.jacobian(
            lambda v: evaluate.run(graph, v).reshape(-1), x).reshape(-1, c.size)
        best = max(best, float(jac.abs().sum(1).max()))
    return best


class ClampNet(torch.nn.Module):
    """Linear -> one-sided clamp -> Sigmoid/Tanh -> Linear (audit finding 1)."""

    def __init__(self, kind: str, act: str, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = torch.nn.Linear(6, 12), torch.nn.Linear(12, 3)
        self.kind, self.act = kind, act

    def forward(self, x):
        z = self.a(x)
        if self.kind == "clamp_max":
            z = torch.clamp(z, max=0.3)
        elif self.kind == "clamp_min":
            z = torch.clamp(z, min=-0.2)
        elif self.kind == "minimum":
            z = torch.minimum(z, torch.tensor(0.1))
        else:
            z = torch.maximum(z, torch.tensor(-0.1))
        return self.b(torch.sigmoid(z) if self.act == "sigmoid" else torch.tanh(z))


@pytest.mark.parametrize("kind", ["clamp_max", "clamp_min", "minimum", "maximum"])
@pytest.mark.parametrize("act", ["sigmoid", "tanh"])
def test_one_sided_clip_gives_sound_local_bounds(tmp_path, kind, act):
    path = export(ClampNet(kind, act), torch.zeros(1, 6), tmp_path / "m.onnx")
    graph = lipcert.load(path)
    assert any(n.op.kind == "Clip" for n in graph.nodes)
    center = np.random.default_rng(1).uniform(-1, 1, 6)
    result = lipcert.bound(graph, "local", "inf", center=center, eps=0.5, bab_time=0)
    assert result.upper is not None and np.isfinite(result.upper), result.notes
    assert result.upper >= box_gradient_lower(graph, center, 0.5)
    for method, norm in (("naive", "2"), ("naive", "inf"), ("lipsdp", "2")):
        upper = lipcert.bound(graph, method, norm).upper
        assert upper >= sampled_gradient_lower(graph, norm, samples=64), (method, norm)


def _min_scalar_sigmoid_model(path):
    """ONNX Min(x W, 0.3) -> Sigmoid -> Gemm, written by hand (the Min(x, scalar) form)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Min", ["h", "c"], ["m"]),
             helper.make_node("Sigmoid", ["m"], ["s"]),
             helper.make_node("MatMul", ["s", "w2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(np.array(0.3, np.float32), "c")]
    g = helper.make_graph(nodes, "minsig", [helper.make_tensor_value_info("x", 1, [1, 4])],
                          [helper.make_tensor_value_info("y", 1, [1, 3])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_min_scalar_certify_local_survives_pgd(tmp_path):
    path = _min_scalar_sigmoid_model(tmp_path / "m.onnx")
    graph = lipcert.load(path)
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, (40, 1, 4))
    with torch.no_grad():
        y = evaluate.run_batch(graph, torch.as_tensor(x)).reshape(40, -1).argmax(1).numpy()
    cert = C.certify(graph, x, y, eps=0.1, method="local", norm="inf")
    assert np.all(np.isfinite(cert.pair_bounds))
    for i in np.flatnonzero(cert.certified(0.1)):
        assert not pgd_flips(graph, x[i], int(y[i]), 0.1, "inf"), i


def pgd_flips(graph, x, label, eps, norm, restarts=3, steps=30, domain=None, seed=0):
    """Projected gradient ascent inside the eps-ball (clipped to ``domain``)."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.as_tensor(x, dtype=torch.float64).reshape(graph.input_shape)
    for restart in range(restarts):
        delta = (torch.rand(x0.shape, generator=gen, dtype=torch.float64) * 2 - 1) \
            * eps * (0.5 if restart else 0.0)
        delta.requires_grad_(True)
        for _ in range(steps):
            point = x0 + delta
            if domain is not None:
                point = point.clamp(*domain)
            logits = evaluate.run(graph, point).reshape(-1)
            loss = torch.cat([logits[:label], logits[label + 1:]]).max() - logits[label]
            if loss.item() > 0:
                return True
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                if norm == "2":
                    delta += 2.5 * eps / steps * grad / (grad.norm() + 1e-30)
                    delta *= min(1.0, eps / float(delta.norm() + 1e-30))
                else:
                    delta += 2.5 * eps / steps * grad.sign()
                    delta.clamp_(-eps, eps)
    return False


def test_certify_local_refuses_samples_outside_the_domain():
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x, y = C.load_data(DATA)
    x, y = x[:5].copy(), y[:5]
    x[2].reshape(-1)[7] = 1.01
    with pytest.raises(InputError, match="outside the domain"):
        C.certify(graph, x, y, eps=0.05, method="local", norm="inf",
                  options={"domain": (0.0, 1.0)})
    with pytest.raises(InputError, match="outside the domain"):
        lipcert.bound(graph, "local", "inf", center=x[2], eps=0.05, domain=(0, 1))


def test_certify_local_cli_outside_domain_is_exit_2(tmp_path):
    x, y = C.load_data(DATA)
    x = x[:4].copy()
    x[0, 0, 0, 0] = 1.01
    data = tmp_path / "d.npz"
    np.savez(data, x=x.astype(np.float32), y=y[:4])
    result = run("certify", MODELS / "digits_mlp.onnx", "--data", data, "--eps", "0.05",
                 "--norm", "inf", "--method", "local", "-o", "domain=0,1")
    assert result.exit_code == 2 and "outside the domain" in result.output


def _cast_model(path, op: str, target_dtype=np.int32):
    nodes = [helper.make_node("Mul", ["x", "k"], ["s"])]
    inits = [numpy_helper.from_array(np.array([[3.0, -2.0]], np.float32), "k")]
    if op == "CastLike":
        nodes.append(helper.make_node("CastLike", ["s", "t"], ["i"]))
        inits.append(numpy_helper.from_array(np.array([0], target_dtype), "t"))
    else:
        nodes.append(helper.make_node("Cast", ["s"], ["i"], to=TensorProto.INT32))
    nodes.append(helper.make_node("Cast", ["i"], ["y"], to=TensorProto.FLOAT))
    g = helper.make_graph(nodes, "cast", [helper.make_tensor_value_info("x", 1, [1, 2])],
                          [helper.make_tensor_value_info("y", 1, [1, 2])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]), path)
    return path


@pytest.mark.parametrize("op", ["CastLike", "Cast"])
def test_integer_casts_are_refused_by_name(tmp_path, op):
    path = _cast_model(tmp_path / "m.onnx", op)
    with pytest.raises(UnsupportedOpsError, match=op):
        lipcert.load(path)
    result = run("bound", path)
    assert result.exit_code == 2 and op in result.output


def test_castlike_to_float_is_still_the_identity(tmp_path):
    path = _cast_model(tmp_path / "m.onnx", "CastLike", np.float32)
    # the model then casts float to INT32? no: CastLike to float, then Cast to float
    graph = lipcert.load(path)
    assert lipcert.bound(graph).upper == pytest.approx(3.0, rel=1e-5)


@pytest.mark.parametrize("op", ["Round", "Floor", "Ceil", "Sign"])
def test_step_functions_are_refused(tmp_path, op):
    nodes = [helper.make_node(op, ["x"], ["y"])]
    g = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", 1, [1, 2])],
                          [helper.make_tensor_value_info("y", 1, [1, 2])])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    result = run("bound", path)
    assert result.exit_code == 2 and op in result.output


def _single_op_model(path, node, inits=()):
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), node], "m",
                          [helper.make_tensor_value_info("x", 1, [1, 3])],
                          [helper.make_tensor_value_info("y", 1, [1, 3])],
                          [numpy_helper.from_array(np.eye(3, dtype=np.float32) * 2, "w"),
                           *inits])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("case", ["clip_nan_min", "leaky_nan_alpha", "overflow_everywhere"])
def test_models_without_a_finite_reading_are_refused(tmp_path, case):
    if case == "clip_nan_min":
        path = _single_op_model(tmp_path / "m.onnx", helper.make_node(
            "Clip", ["h", "lo", ""], ["y"]), [numpy_helper.from_array(
                np.array(np.nan, np.float32), "lo")])
    elif case == "leaky_nan_alpha":
        path = _single_op_model(tmp_path / "m.onnx", helper.make_node(
            "LeakyRelu", ["h"], ["y"], alpha=float("nan")))
    else:  # finite weights, but every output overflows float32
        big = numpy_helper.from_array(np.array(1e38, np.float32), "big")
        g = helper.make_graph(
            [helper.make_node("Mul", ["x", "big"], ["a"]),
             helper.make_node("Mul", ["a", "big"], ["y"])], "m",
            [helper.make_tensor_value_info("x", 1, [1, 3])],
            [helper.make_tensor_value_info("y", 1, [1, 3])], [big])
        path = tmp_path / "m.onnx"
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises((InputError, ModelRefused)):
        lipcert.load(path)
    result = run("bound", path)
    assert result.exit_code == 2, result.output
    assert "max relative difference 0.0e+00" not in result.output


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_data_are_input_errors(tmp_path, bad):
    x, y = C.load_data(DATA)
    x = x[:6].copy()
    x[3, 0, 2, 2] = bad
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=y[:6])
    for method, norm in (("naive", "2"), ("local", "inf")):
        result = run("certify", MODELS / "digits_mlp.onnx", "--data", data, "--eps", "0.05",
                     "--norm", norm, "--method", method)
        assert result.exit_code == 2 and "NaN or infinite" in result.output, result.output
    point = tmp_path / "p.npy"
    np.save(point, x[3])
    for method in ("local", "lower", "exact"):
        result = run("bound", MODELS / "digits_mlp.onnx", "-m", method, "-n", "inf",
                     "--input", point, "--eps", "0.05")
        assert result.exit_code == 2 and "NaN or infinite" in result.output, \
            (method, result.output)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_non_finite_eps_and_domain_are_input_errors(value):
    base = ("certify", MODELS / "digits_mlp.onnx", "--data", DATA)
    assert run(*base, "--eps", value).exit_code == 2
    result = run("bound", MODELS / "digits_mlp.onnx", "-m", "local", "-n", "inf", "--input",
                 DATA, "--index", "0", "--eps", "0.05", "--domain", f"0,{value}")
    assert result.exit_code == 2 or value == "-1"  # 0,-1: LOW > HIGH, also exit 2
    assert result.exit_code == 2


def test_certified_radius_never_certifies_nan():
    assert C.certified_radius(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == 0.0
    assert C.certified_radius(np.array([1.0, 2.0]), np.array([2.0, 1.0])) == \
        pytest.approx(0.5)
    assert C.certified_radius(np.array([-1.0]), np.array([1.0])) == 0.0
    with pytest.raises(InternalCheckFailed):
        C.certified_radius(np.array([1.0]), np.array([np.nan]))
    with pytest.raises(InternalCheckFailed):
        C.certified_radius(np.array([1.0]), np.array([-2.0]))
    assert C.certified_radius(np.array([1.0]), np.array([0.1]), cap=0.05) == 0.05


# --- a NaN anywhere on a method's path gives no bound --------------------------------------

SITE_RUNS = {
    "naive.factor": ("digits_mlp.onnx", "naive", "2", {}),
    "gram.layer": ("digits_cnn.onnx", "gram", "2", {}),
    "lipsdp.rho": ("digits_mlp.onnx", "lipsdp", "2", {"form": "eclipse-fast"}),
    "local.relaxation": ("digits_mlp.onnx", "local", "inf", {"bab_time": 0}),
    "local.jacobian": ("digits_cnn.onnx", "local", "inf", {"bab_time": 0}),
    "exact.value": ("small_relu", "exact", "inf", {}),
}


def _tiny_relu_graph():
    from helpers import random_mlp

    from lipcert.ir import ops as O

    return random_mlp([3, 6, 2], O.Relu(), seed=0)


@pytest.mark.parametrize("site", sorted(SITE_RUNS))
def test_injected_nan_yields_no_bound(site):
    model, method, norm, options = SITE_RUNS[site]
    graph = _tiny_relu_graph() if model == "small_relu" else lipcert.load(MODELS / model)
    if method in ("local", "exact"):
        x, _ = C.load_data(DATA) if model != "small_relu" else (np.zeros((1, 3)), None)
        options = {**options, "center": x[0].reshape(-1), "eps": 0.05}
    clean = lipcert.bound(graph, method, norm, **options)
    assert clean.upper is not None and clean.upper > 0, clean.notes
    with inject_nan(site):
        result = lipcert.bound(graph, method, norm, **options)
    assert result.upper is None and result.internal_error, (site, result.upper)
    assert "internal check failed" in result.notes[-1]


@pytest.mark.parametrize("site", ["certify.logits", "certify.pair_bound"])
@pytest.mark.parametrize("method,norm", [("naive", "2"), ("local", "inf")])
def test_injected_nan_in_certify_certifies_nothing(site, method, norm):
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x, y = C.load_data(DATA)
    try:
        with inject_nan(site):
            cert = C.certify(graph, x[:8], y[:8], eps=0.01, method=method, norm=norm)
    except InternalCheckFailed:
        return
    # a NaN logit makes its sample uncertified; nothing else may change for the worse
    assert not cert.certified(0.01)[0]


def test_every_site_is_exercised():
    assert set(SITE_RUNS) | {"certify.logits", "certify.pair_bound", "lower.value"} == \
        set(SITES)


def test_lower_value_nan_is_never_a_bound():
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    with inject_nan("lower.value"):
        result = lipcert.bound(graph, "lower", "2", samples=16)
    assert result.upper is None and result.lower == 0.0


def test_injected_nan_cli_exit_3(monkeypatch):
    from lipcert import soundness

    monkeypatch.setattr(soundness, "_ACTIVE", {"naive.factor"})
    result = run("bound", MODELS / "digits_mlp.onnx")
    assert result.exit_code == 3 and "internal check failed" in result.output


# --- the self-check catches a deliberately broken method --------------------------------


def test_self_check_catches_a_broken_relaxation(monkeypatch):
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x, _ = C.load_data(DATA)
    real = relaxations.relax

    def broken(op, l, u, split):  # derivative intervals shrunk 10x: plausible, and wrong
        r = real(op, l, u, split)
        r.dl, r.du = r.dl * 0.1, r.du * 0.1
        return r

    monkeypatch.setattr("lipcert.estimators.local.jacobian.relax", broken)
    options = {"center": x[0].reshape(-1), "eps": 0.05, "bab_time": 0}
    result = lipcert.bound(graph, "local", "inf", **options)
    assert result.upper is None and result.internal_error
    assert "soundness check failed" in result.notes[-1]
    unchecked = lipcert.bound(graph, "local", "inf", self_check=False, **options)
    assert unchecked.upper is not None  # what the check prevents from being printed
    assert any("self-check skipped" in n for n in unchecked.notes)


def test_self_check_catches_a_broken_layer_norm(monkeypatch):
    from lipcert.estimators import naive

    monkeypatch.setitem(naive.UNARY, naive.O.Relu, lambda *a: (0.01, "broken"))
    result = run("bound", MODELS / "digits_mlp.onnx")
    assert result.exit_code == 3 and "soundness check failed" in result.output
    assert run("bound", MODELS / "digits_mlp.onnx", "--no-self-check").exit_code == 0


def test_certify_attack_check_catches_a_wrong_radius(monkeypatch):
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x, y = C.load_data(DATA)
    real = C.certified_radius
    monkeypatch.setattr(C, "certified_radius", lambda m, l, cap=np.inf: 100 * real(m, l, cap))
    with pytest.raises(InternalCheckFailed, match="soundness check failed"):
        C.certify(graph, x[:30], y[:30], eps=0.1, method="naive", norm="2")


def test_certify_local_with_domain_survives_pgd():
    graph = lipcert.load(MODELS / "digits_mlp.onnx")
    x, y = C.load_data(DATA)
    x, y = x[:30], y[:30]
    cert = C.certify(graph, x, y, eps=0.02, method="local", norm="inf",
                     options={"domain": (0.0, 1.0)})
    certified = np.flatnonzero(cert.certified(0.02))
    assert len(certified) > 10
    for i in certified:
        assert not pgd_flips(graph, x[i], int(y[i]), 0.02, "inf", domain=(0.0, 1.0)), i
    # the attack has teeth: far outside the certified radius it flips some samples
    assert any(pgd_flips(graph, x[i], int(y[i]), 0.3, "inf", restarts=1, domain=(0, 1))
               for i in certified[:10])


def test_special_files_are_refused_at_once(tmp_path, monkeypatch):
    import os

    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/zero", tmp_path):
        result = run("bound", path)
        assert result.exit_code == 2, (path, result.output)
    monkeypatch.setenv("LIPCERT_MAX_MODEL_BYTES", "100")
    result = run("bound", MODELS / "digits_mlp.onnx")
    assert result.exit_code == 2 and "LIPCERT_MAX_MODEL_BYTES" in result.output


def test_json_and_markdown_cannot_both_go_to_stdout():
    result = run("compare", MODELS / "digits_mlp.onnx", "--methods", "naive", "--json", "-",
                 "--markdown", "-")
    assert result.exit_code == 2 and "stdout" in result.output
