"""``local`` on a device other than the default one.

No GPU is needed: torch's default device is set to ``meta`` while ``local`` runs with
device "cpu", so a tensor that the code makes without naming the device (the bug that would
break ``--device cuda``) lands on ``meta`` and the first operation mixing it with the
model's tensors raises. The numbers must equal those of a plain run.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import MODELS

import lipcert
from lipcert.cli import cli
from lipcert.estimators.local import jacobian
from lipcert.estimators.local.estimator import LOCAL_MAX_ENTRIES, local_bound
from lipcert.estimators.local.margin import margin_bounds
from lipcert.ir.lowering import build_affine_dag, cached_affine_dag

DIGITS = MODELS / "digits_test.npz"


@contextlib.contextmanager
def stray_tensors_on_meta():
    jacobian._ROOT_CACHE.clear()  # every pass computed, none read back
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
        jacobian._ROOT_CACHE.clear()


def _box(index: int, eps: float) -> tuple[np.ndarray, np.ndarray]:
    x0 = np.load(DIGITS)["x"][index].reshape(-1).astype(np.float64)
    return np.clip(x0 - eps, 0, 1), np.clip(x0 + eps, 0, 1)


@pytest.mark.parametrize("model,eps", [("digits_cnn", 0.02), ("digits_resnet", 0.02),
                                       ("digits_maxmin", 0.05), ("digits_mlp", 0.05)])
def test_local_bound_names_its_device_everywhere(model, eps):
    dag = build_affine_dag(lipcert.load(MODELS / f"{model}.onnx"), "local")
    low, high = _box(1, eps)
    c = np.eye(10)[[0, 3]]
    # plain branching (deterministic: no timing-dependent optimisation probe) ...
    kwargs = {"bab_time": math.inf, "max_domains": 40, "batch": 8, "optimize_steps": 0}
    with stray_tensors_on_meta():
        moved = local_bound(dag, low, high, c, device="cpu", **kwargs)
    plain = local_bound(dag, low, high, c, **kwargs)
    assert moved.per_query == plain.per_query
    assert moved.domains == plain.domains and moved.root == plain.root
    # ... and optimised bounds, at the root and in split domains
    with stray_tensors_on_meta():
        optimised = local_bound(dag, low, high, c, device="cpu", bab_time=math.inf,
                                max_domains=20, batch=4, optimize_steps=3)
    assert optimised.upper <= optimised.root


@pytest.mark.parametrize("model,eps", [("digits_cnn", 0.04), ("digits_mlp", 0.03)])
def test_margin_bounds_name_their_device_everywhere(model, eps):
    dag = build_affine_dag(lipcert.load(MODELS / f"{model}.onnx"), "local")
    low, high = _box(0, eps)
    label = int(np.load(DIGITS)["y"][0])
    c = np.eye(10)[label] - np.delete(np.eye(10), label, axis=0)  # every logit difference
    kwargs = {"threshold": 0.0, "time_budget": math.inf, "max_domains": 30, "batch": 4,
              "iterations": 2, "child_iterations": 0}
    with stray_tensors_on_meta():
        moved = margin_bounds(dag, low, high, c, device="cpu", **kwargs)
    plain = margin_bounds(dag, low, high, c, **kwargs)
    np.testing.assert_array_equal(moved.lower, plain.lower)
    np.testing.assert_array_equal(moved.root, plain.root)
    assert moved.domains == plain.domains > c.shape[0]  # it branched


def test_dag_copies_are_made_once_per_device():
    dag = build_affine_dag(lipcert.load(MODELS / "digits_mlp.onnx"), "local")
    assert dag.to("cpu") is dag
    meta = dag.to("meta")
    assert meta is dag.to("meta") and meta.device.type == "meta"
    assert all(m.device.type == "meta" for a in meta.pre for m in a.maps.values())


def test_cli_refuses_a_device_it_does_not_have():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(cli, ["bound", str(MODELS / "digits_mlp.onnx"), "--method",
                                      "local", "--input", str(DIGITS), "--index", "0",
                                      "--eps", "0.01", "--device", "cuda"])
    assert result.exit_code == 2
    assert "no CUDA device" in result.output


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_the_estimator_passes_its_device_on(norm):
    graph = lipcert.load(MODELS / "digits_resnet.onnx")
    x0 = np.load(DIGITS)["x"][3].reshape(-1)
    kwargs = {"center": x0, "eps": 0.02, "domain": (0, 1), "bab_time": math.inf,
              "max_domains": 20, "optimize_steps": 0}
    # the DAG is built on the host, with torch's default device (cached for the call)
    cached_affine_dag(graph, "local", LOCAL_MAX_ENTRIES, max_ops=True)
    with stray_tensors_on_meta():
        moved = lipcert.bound(graph, "local", norm, device="cpu", self_check=False, **kwargs)
    plain = lipcert.bound(graph, "local", norm, **kwargs)
    assert moved.upper == plain.upper and moved.per_query == plain.per_query


def test_cuda_convolutions_are_sums_of_products():
    from lipcert.estimators.common.devices import dot_product_arithmetic

    before = torch.backends.cudnn.enabled
    with dot_product_arithmetic("cuda:0"):
        assert torch.backends.cudnn.enabled is False  # no FFT/Winograd algorithms
    with dot_product_arithmetic("cpu"):
        assert torch.backends.cudnn.enabled == before
    assert torch.backends.cudnn.enabled == before
