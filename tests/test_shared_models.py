"""Real models written by others (../shared/onnx); skipped when that folder is absent."""

from __future__ import annotations

import pytest
from helpers import SHARED, needs_shared, sampled_gradient_lower, shared_models

import lipcert
from lipcert.errors import ModelRefused, UnsupportedOpsError

pytestmark = needs_shared
BOUNDABLE = [m for m in shared_models() if m["expect"] == "bound"]


@pytest.fixture(scope="module")
def graphs():
    return {}


def _graph(cache, name):
    if name not in cache:
        cache[name] = lipcert.load(SHARED / name)
    return cache[name]


@pytest.mark.parametrize("entry", BOUNDABLE, ids=[m["file"] for m in BOUNDABLE])
@pytest.mark.parametrize("norm", ["2", "inf"])
def test_naive_bound_is_above_sampled_lower_bound(graphs, entry, norm):
    graph = _graph(graphs, entry["file"])
    upper = lipcert.bound(graph, "naive", norm).upper
    lower = sampled_gradient_lower(graph, norm, samples=16)
    assert upper >= lower
    if norm == "2" and "sampled_l2_lower" in entry:
        assert upper >= entry["sampled_l2_lower"]
    if norm == "2" and "exact_l2" in entry:
        assert upper >= entry["exact_l2"]


def test_test_small_is_exactly_24(graphs):
    upper = lipcert.bound(_graph(graphs, "test_small.onnx"), "naive", "2").upper
    assert upper >= 24.0 and f"{upper:.6g}" == "24"


def test_linear_bn_linear_within_published_range(graphs):
    upper = lipcert.bound(_graph(graphs, "linear2-3_bn1-linear3-1.onnx"), "naive", "2").upper
    assert 2.828413 <= upper <= 4.2427


def test_ac1_refused_naming_onnxruntime_error():
    with pytest.raises(ModelRefused, match="onnxruntime refuses"):
        lipcert.load(SHARED / "AC1.onnx")


def test_ml4acopf_lists_every_unsupported_op_type():
    with pytest.raises(UnsupportedOpsError) as info:
        lipcert.load(SHARED / "14_ieee_ml4acopf.onnx")
    for op in ("Sin", "Cos", "Pow"):
        assert op in str(info.value)


@pytest.mark.parametrize("name", ["cartpole.onnx", "fc_2-2sigmoids-3.onnx", "test_small.onnx"])
def test_lipsdp_between_lower_and_naive(graphs, name):
    graph = _graph(graphs, name)
    result = lipcert.bound(graph, "lipsdp", "2")
    assert result.upper is not None, result.notes
    assert sampled_gradient_lower(graph, "2", samples=32) <= result.upper
    assert result.upper <= lipcert.bound(graph, "naive", "2").upper * (1 + 1e-6)
