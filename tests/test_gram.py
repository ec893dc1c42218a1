"""Gram-iteration bounds against the exact SVD of unrolled operators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import SHARED, exact_l2, export, needs_shared, unrolled
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import lipcert
from lipcert.estimators.gram import core as G
from lipcert.estimators.gram import exact_banded as E
from lipcert.estimators.gram import semi_circular as S
from lipcert.estimators.gram.estimator import GramEstimator, merged_residual_conv
from lipcert.ir import evaluate
from lipcert.ir import ops as O

EST = GramEstimator()
NO_UNROLL = {"unroll_min_side": 0, "exact_max_cost": 0}


def _exact(op, in_shape):
    return exact_l2(unrolled(lambda x: evaluate.apply(op, x) - evaluate.apply(
        op, torch.zeros_like(x)), in_shape))


def _bound(op, in_shape, **options):
    out_shape = tuple(evaluate.apply(op, torch.zeros(in_shape, dtype=torch.float64)).shape)
    return EST.layer_bound(op, in_shape, out_shape, options)


conv_cases = st.fixed_dictionaries({
    "k": st.integers(1, 7), "stride": st.integers(1, 2), "dilation": st.integers(1, 2),
    "groups": st.sampled_from([1, 2, 4]), "c": st.sampled_from([1, 2, 4, 8, 16]),
    "n": st.integers(2, 16), "pads": st.sampled_from(["zero", "same", "asym"]),
    "scale": st.sampled_from([1e-6, 1.0, 1e6]), "seed": st.integers(0, 10**6)})


def _make_conv(case):
    k, d, g = case["k"], case["dilation"], case["groups"]
    c_in = c_out = case["c"] * g
    half = ((k - 1) * d) // 2
    pads = {"zero": (0, 0, 0, 0), "same": (half,) * 4,
            "asym": (half + 1, 0, 0, half)}[case["pads"]]
    rng = np.random.default_rng(case["seed"])
    w = rng.standard_normal((c_out, c_in // g, k, k)) * case["scale"]
    return O.Conv(w, None, (case["stride"],) * 2, pads, (d, d), g), (1, c_in, case["n"], case["n"])


# assume() redraws filtered cases; too many filtered draws are expected, not an error
FILTERED = [HealthCheck.too_slow, HealthCheck.filter_too_much]


def _usable_case(case, max_size: int):
    """(op, shape) of a drawn conv case, or None when the kernel does not fit the padded
    input or the unrolled operator would exceed ``max_size`` inputs."""
    op, shape = _make_conv(case)
    k_eff = (op.weight.shape[2] - 1) * op.dilation[0] + 1
    fits = min(shape[2] + op.pads[0] + op.pads[2], shape[3] + op.pads[1] + op.pads[3]) >= k_eff
    return (op, shape) if fits and np.prod(shape) <= max_size else None


@settings(max_examples=45, deadline=None, suppress_health_check=FILTERED)
@given(case=conv_cases)
def test_conv_bound_sound_and_within_one_percent(case):
    usable = _usable_case(case, 1024)
    assume(usable is not None)  # a filtered case is redrawn, never counted as a pass
    op, shape = usable
    exact = _exact(op, shape)
    value, best, cands = _bound(op, shape)
    assert value >= exact * (1 - 1e-12), (best, cands)
    assert value <= exact * 1.01 + 1e-300, (best, cands)
    # the circular candidate alone must be sound too (both ways of bounding its blocks); a
    # 1x1 conv gets its exact channel-matrix norm instead
    if op.weight.shape[2:] == (1, 1):
        assert cands["1x1"] >= exact * (1 - 1e-12)
    else:  # (both spectral modes alone: test_gram_circular_candidate_is_sound)
        assert cands["circular"] >= exact * (1 - 1e-12)
        assert cands.get("exact", exact) >= exact


@settings(max_examples=30, deadline=None, suppress_health_check=FILTERED)
@given(case=conv_cases)
def test_gram_circular_candidate_is_sound(case):
    usable = _usable_case(case, 1200)
    assume(usable is not None)
    op, shape = usable
    exact = _exact(op, shape)
    for spectral in G.SPECTRAL:
        circular = G.conv_circular_bound(op.weight, shape[2:], op.stride, op.pads, op.dilation,
                                         op.groups, spectral=spectral)
        assert circular >= exact * (1 - 1e-12)


@pytest.mark.parametrize("name,weight,shape,pads", [
    ("zero padding n=2", np.random.default_rng(0).standard_normal((4, 4, 3, 3)), (1, 4, 2, 2),
     (1, 1, 1, 1)),
    ("all-zero channel", np.concatenate([np.zeros((1, 3, 3, 3)),
                                         np.random.default_rng(1).standard_normal((3, 3, 3, 3))]),
     (1, 3, 5, 5), (1, 1, 1, 1)),
    ("all zero", np.zeros((2, 2, 3, 3)), (1, 2, 4, 4), (0, 0, 0, 0)),
    ("tiny", 1e-150 * np.random.default_rng(2).standard_normal((3, 3, 3, 3)), (1, 3, 6, 6),
     (1, 1, 1, 1)),
    ("huge", 1e150 * np.random.default_rng(3).standard_normal((3, 3, 3, 3)), (1, 3, 6, 6),
     (1, 1, 1, 1)),
])
def test_conv_regressions(name, weight, shape, pads):
    op = O.Conv(weight, None, (1, 1), pads, (1, 1), 1)
    exact = _exact(op, shape)
    for options in ({}, NO_UNROLL):
        value, best, cands = _bound(op, shape, **options)
        assert np.isfinite(value) and value >= exact * (1 - 1e-12), (name, cands)
    for spectral in G.SPECTRAL:
        circular = G.conv_circular_bound(weight, shape[2:], (1, 1), pads, (1, 1), 1,
                                         spectral=spectral)
        assert circular >= exact * (1 - 1e-12) and np.isfinite(circular)


@pytest.mark.parametrize("shape", [(3, 200), (64, 64), (1, 5), (300, 2)])
def test_dense_gram_iteration(shape):
    rng = np.random.default_rng(0)
    for scale in (1e-100, 1.0, 1e100):
        w = rng.standard_normal(shape) * scale
        exact = exact_l2(w)
        bound = G.dense_gram_bound(w, iterations=12)
        assert exact <= bound <= exact * 1.01


def test_gram_spectral_bounds_decrease_with_iterations():
    a = torch.as_tensor(np.random.default_rng(0).standard_normal((4, 16, 16)))
    exact = torch.linalg.matrix_norm(a, 2)
    previous = None
    for t in range(1, 12):
        b = G.gram_spectral_bounds(a, t)
        assert torch.all(b >= exact)
        if previous is not None:
            assert torch.all(b <= previous * (1 + 1e-12))
        previous = b


@settings(max_examples=20, deadline=None)
@given(k=st.integers(1, 4), stride=st.integers(1, 3), n=st.integers(2, 5), seed=st.integers(0, 999))
def test_conv_transpose_and_avgpool(k, stride, n, seed):
    rng = np.random.default_rng(seed)
    op = O.ConvTranspose(rng.standard_normal((3, 2, k, k)), None, (stride, stride),
                         (0, 0, 0, 0), (0, 0), (1, 1), 1)
    shape = (1, 3, n, n)
    exact = _exact(op, shape)
    for options in ({}, NO_UNROLL):
        value, _, cands = _bound(op, shape, **options)
        assert value >= exact * (1 - 1e-12), cands
    pool = O.AvgPool((k, k), (stride, stride), (0, 0, 0, 0), False, True)
    shape = (1, 2, n + k, n + k)
    exact = _exact(pool, shape)
    for options in ({}, NO_UNROLL):
        value, _, cands = _bound(pool, shape, **options)
        assert value >= exact * (1 - 1e-12), cands


def test_linear_residual_merges_into_i_plus_w(tmp_path):
    class LinearResidual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return x - self.conv(x)

    torch.manual_seed(0)
    module = LinearResidual()
    with torch.no_grad():
        module.conv.weight.mul_(0.2)
    graph = lipcert.load(export(module, torch.randn(1, 3, 6, 6), tmp_path / "r.onnx"))
    add = next(n for n in graph.nodes if isinstance(n.op, O.Add))
    src, merged = merged_residual_conv(add, graph)
    x = torch.randn(graph.input_shape, dtype=torch.float64)
    full = evaluate.run(graph, x) - evaluate.run(graph, torch.zeros_like(x))
    assert torch.allclose(evaluate.apply(merged, x), full, atol=1e-10)
    exact = exact_l2(unrolled(lambda v: evaluate.run(graph, v) - evaluate.run(
        graph, torch.zeros_like(v)), graph.input_shape))
    result = lipcert.bound(graph, "gram")
    naive = lipcert.bound(graph, "naive")
    assert exact <= result.upper <= exact * 1.01 < naive.upper
    assert result.details["residual_merges"]


@needs_shared
@pytest.mark.parametrize("name", ["resnet_2b.onnx", "cifar_base_kw.onnx", "Convnet_avgpool.onnx",
                                  "Convnet_maxpool.onnx",
                                  "cGAN_imgSz32_nCh_3_nonlinear_activations.onnx"])
def test_gram_below_naive_on_shared_conv_models(name):
    graph = lipcert.load(SHARED / name)
    gram, naive = lipcert.bound(graph, "gram"), lipcert.bound(graph, "naive")
    assert gram.upper <= naive.upper * (1 + 1e-12)
    if name in ("resnet_2b.onnx", "cifar_base_kw.onnx"):
        assert gram.upper < 0.9 * naive.upper


@settings(max_examples=40, deadline=None, suppress_health_check=FILTERED)
@given(case=conv_cases)
def test_exact_conv_candidate_is_tight_and_sound(case):
    usable = _usable_case(case, 1024)
    assume(usable is not None and usable[0].weight.shape[2:] != (1, 1))
    op, shape = usable
    exact = _exact(op, shape)
    value = E.exact_banded_norm(op.weight, shape[2:], op.stride, op.pads, op.dilation,
                                op.groups, 1e12)
    assert value is not None
    assert exact <= value <= exact * (1 + 1e-5) + 1e-300


@pytest.mark.parametrize("side", ["input", "output"])
def test_tap_products_match_the_unrolled_taps_products(side):
    """The Gram blocks from single-tap products equal the products of the unrolled rows
    (stride, dilation and asymmetric padding along the unrolled axis)."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 2, 3, 2))  # (C_out, C_in, k_e, k_c): unrolled axis last
    n_c, stride, dilation, pad = 7, 2, 2, 1
    out_c = (n_c + pad + 1 - (2 - 1) * dilation - 1) // stride + 1
    taps = E.unrolled_taps(w, n_c, out_c, stride, dilation, pad)
    reads = S._reads(n_c, out_c, 2, stride, dilation, pad)
    product = E.tap_products(w, reads, n_c, out_c, side)
    for a in range(3):
        for a2 in range(3):
            truth = taps[a].T @ taps[a2] if side == "input" else taps[a] @ taps[a2].T
            assert np.abs(product(a, a2)[0].numpy() - truth).max() <= 1e-12


def test_unrolled_taps_give_the_conv():
    rng = np.random.default_rng(7)
    op = O.Conv(rng.standard_normal((3, 2, 3, 3)), None, (1, 2), (1, 0, 0, 2), (1, 1), 1)
    shape = (1, 2, 5, 6)
    y_ref = evaluate.apply(op, torch.as_tensor(rng.standard_normal(shape)))
    x = torch.as_tensor(rng.standard_normal(shape))
    y_ref = evaluate.apply(op, x).numpy()[0]  # (C_out, out_h, out_w)
    out_h, out_w = y_ref.shape[1:]
    taps = E.unrolled_taps(op.weight, 6, out_w, 2, 1, 0)  # (k_h, out_w C_out, 6 C_in)
    rows = x.numpy()[0].transpose(1, 2, 0).reshape(5, -1)  # (h, w C_in)
    y = np.zeros((out_h, out_w * 3))
    for i in range(out_h):
        for a in range(3):
            p = i + a - 1
            if 0 <= p < 5:
                y[i] += taps[a] @ rows[p]
    assert np.allclose(y.reshape(out_h, out_w, 3).transpose(2, 0, 1), y_ref, atol=1e-12)


def test_exact_candidate_refuses_over_its_cost_and_a_failed_certificate():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 4, 3, 3))
    geometry = ((5, 5), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    cost = E.plan(w.shape, *geometry)["cost"]
    assert E.exact_banded_norm(w, *geometry, cost * 0.99) is None
    assert E.exact_banded_norm(w, *geometry, cost) is not None
    # a wrong estimate below the largest eigenvalue by more than the margins: no certificate
    taps = torch.as_tensor(E.unrolled_taps(w, 5, 5, 1, 1, 1))[None]
    reads = S._reads(5, 5, 3, 1, 1, 1)
    truth = _exact(O.Conv(w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1), (1, 4, 5, 5))
    assert S.banded_operator_norm(taps, reads, 5, 5, "input",
                                  estimate=0.9 * truth ** 2) is None
    value = S.banded_operator_norm(taps, reads, 5, 5, "input", estimate=truth ** 2)
    assert truth <= value <= truth * (1 + 1e-6)


def test_exact_candidate_beats_the_circular_embedding_on_small_inputs():
    rng = np.random.default_rng(6)
    op = O.Conv(rng.standard_normal((16, 16, 3, 3)), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    shape = (1, 16, 4, 4)
    exact = _exact(op, shape)
    value, best, cands = _bound(op, shape)
    _, _, circ = _bound(op, shape, exact_max_cost=0)
    assert best == "exact" and exact <= value <= exact * (1 + 1e-5)
    assert circ["circular"] > 1.03 * exact  # the gap the exact candidate closes


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("scale", [1e-160, 1e-120, 1.0, 1e120, 1e160])
def test_certified_block_max_is_tight_and_sound(complex_, scale):
    rng = np.random.default_rng(7)
    for shape in [(40, 6, 9), (3, 30, 30), (7, 1, 5), (5, 17, 2)]:
        a = rng.standard_normal(shape)
        if complex_:
            a = a + 1j * rng.standard_normal(shape)
        a[0] = 0.0  # a zero block
        a[-1] *= 3.0  # a clear maximum; and rank-deficient blocks below
        a[1] = np.outer(a[1][:, 0], a[1][0])
        truth = max(np.linalg.svd(b, compute_uv=False)[0] for b in a)
        value = G.certified_block_max(torch.as_tensor(a * scale))
        assert truth * scale <= value <= truth * scale * (1 + 1e-8), (shape, value, truth)


def test_certified_block_max_recovers_from_bad_estimates(monkeypatch):
    """With useless estimates the first shift is wrong for most blocks: the certificate
    must refuse them, and the retry must still end at the true maximum."""
    rng = np.random.default_rng(8)
    a = torch.as_tensor(rng.standard_normal((50, 12, 12)) * np.linspace(0.5, 2.0, 50)[:, None,
                                                                                     None])
    monkeypatch.setattr(G, "_rayleigh_estimates", lambda h: torch.zeros(h.shape[0],
                                                                       dtype=torch.float64))
    truth = float(torch.linalg.matrix_norm(a, 2).max())
    value = G.certified_block_max(a, refine=1)
    assert truth <= value <= truth * (1 + 1e-6)
    bad = a.clone()
    bad[3, 2, 2] = float("nan")
    assert np.isnan(G.certified_block_max(bad))


def test_subnormal_and_huge_kernels_stay_sound():
    """Kernels near the ends of the float range: the FFT's relative error bound needs the
    scaling by a power of two; the truth is the exact norm of the same integers, scaled."""
    rng = np.random.default_rng(9)
    ints = rng.integers(-7, 8, size=(3, 3, 3, 3)).astype(np.float64)
    shape = (1, 3, 5, 5)
    base = _exact(O.Conv(ints, None, (1, 1), (1, 1, 1, 1), (1, 1), 1), shape)
    for exponent in (-1074, -1060, 1000):
        op = O.Conv(np.ldexp(ints, exponent), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
        truth = np.ldexp(base, exponent)  # the stored kernel is exactly ints 2^exponent
        for spectral in G.SPECTRAL:
            value = G.conv_circular_bound(op.weight, shape[2:], op.stride, op.pads,
                                          op.dilation, 1, spectral=spectral)
            assert truth <= value <= truth * 1.5 + 64 * 2.0**-1074, (exponent, spectral)
        value, best, cands = _bound(op, shape)
        # tight up to a few subnormal steps (each rounding up adds 2^-1074)
        assert truth <= value <= truth * 1.01 + 64 * 2.0**-1074, (exponent, cands)


@settings(max_examples=30, deadline=None)
@given(c_out=st.integers(1, 6), c_in=st.integers(1, 6), kh=st.integers(1, 5),
       kw=st.integers(1, 5), extra_h=st.integers(0, 9), extra_w=st.integers(0, 9),
       seed=st.integers(0, 1000), scale=st.sampled_from([1.0, 1e-3, 1e3]))
def test_direct_dft_blocks_match_the_fft_within_their_error(c_out, c_in, kh, kw, extra_h,
                                                            extra_w, seed, scale):
    """The few-tap DFT blocks (direct sums with the taps' phases) are the rfft2 blocks, in
    the same order, to within the error bound they report (the FFT agrees far inside it)."""
    w = np.random.default_rng(seed).standard_normal((c_out, c_in, kh, kw)) * scale
    size = (kh + extra_h, kw + extra_w)
    direct, err = G._direct_frequency_blocks(w, size)
    fft = torch.fft.rfft2(torch.as_tensor(w), s=size).permute(2, 3, 0, 1).reshape(
        -1, c_out, c_in)
    assert direct.shape == fft.shape
    gap = torch.linalg.matrix_norm(direct - fft, 2).max().item() if direct.numel() else 0.0
    assert gap <= err
    assert err <= 1e-11 * max(1.0, float(np.linalg.norm(w)))  # the bound is not vacuous


def _semi_dense(w, n, m):
    """max over w-frequencies of the dense norm of T(v), built from its definition (stride 1,
    dilation 1, 'same' padding of a k x k kernel, circular size m along w): independent of
    the banded code."""
    c_out, c_in, k, _ = w.shape
    pad = (k - 1) // 2
    best = 0.0
    for v in range(m):
        taps = np.tensordot(w, np.exp(-2j * np.pi * np.arange(k) * v / m), axes=([3], [0]))
        t = np.zeros((n, c_out, n, c_in), complex)
        for i in range(n):
            for a in range(k):
                if 0 <= i + a - pad < n:
                    t[i, :, i + a - pad, :] += taps[:, :, a]
        best = max(best, np.linalg.norm(t.reshape(n * c_out, n * c_in), 2))
    return best


@settings(max_examples=40, deadline=None, suppress_health_check=FILTERED)
@given(case=conv_cases)
def test_semi_circular_candidate_is_sound_and_below_the_circular_one(case):
    usable = _usable_case(case, 1024)
    assume(usable is not None)
    op, shape = usable
    exact = _exact(op, shape)
    value = S.semi_circular_norm(op.weight, shape[2:], op.stride, op.pads, op.dilation,
                                 op.groups, 10**6)
    circular = G.conv_circular_bound(op.weight, shape[2:], op.stride, op.pads, op.dilation,
                                     op.groups)
    assert value is not None
    assert exact * (1 - 1e-12) <= value <= circular * (1 + 1e-6) + 1e-300


@pytest.mark.parametrize("n,k,c", [(4, 3, 6), (6, 5, 3), (5, 3, 4)])
def test_semi_circular_candidate_is_tight_to_its_dense_value(n, k, c):
    rng = np.random.default_rng(n * k)
    w = rng.standard_normal((c + 1, c, k, k))
    pad = (k - 1) // 2
    value = S.semi_circular_norm(w, (n, n), (1, 1), (pad,) * 4, (1, 1), 1, 10**6)
    dense = _semi_dense(w, n, G.circular_size(n, pad, pad, k, 1, 1))
    exact = _exact(O.Conv(w, None, (1, 1), (pad,) * 4, (1, 1), 1), (1, c, n, n))
    assert dense <= value <= dense * (1 + 1e-6)
    assert exact < dense  # exact along h: below the circular bound, above the exact norm


@pytest.mark.parametrize("width", [1, 2])
def test_banded_certificate_refuses_a_shift_below_the_largest_eigenvalue(width):
    rng = np.random.default_rng(11 + width)
    blocks, ch = 4, 3
    n = blocks * ch
    a = rng.standard_normal((2, n, n)) + 1j * rng.standard_normal((2, n, n))
    h = a.conj().transpose(0, 2, 1) @ a
    for r in range(blocks):  # keep the band: blocks further than ``width`` apart are zero
        for c in range(blocks):
            if abs(r - c) > width:
                h[:, r * ch:(r + 1) * ch, c * ch:(c + 1) * ch] = 0.0
    h = torch.as_tensor(h)
    bands = [[h[:, (k + d) * ch:(k + d + 1) * ch, k * ch:(k + 1) * ch].clone()
              for k in range(blocks - d)] for d in range(width + 1)]
    top = torch.linalg.eigvalsh(h)[:, -1]
    zero = torch.zeros(2, dtype=torch.float64)
    for factor, expected in [(0.999, False), (1.001, True)]:
        s = float(top.max()) * factor
        ok = S.banded_cholesky_certifies(bands, s, zero)
        assert bool(ok[int(top.argmax())]) is expected
    # the formation error must widen the shift: 1% of error does not fit in 0.5% of room
    s = float(top.max()) * 1.005
    ok = S.banded_cholesky_certifies(bands, s, torch.full((2,), 0.01 * float(top.max()),
                                                          dtype=torch.float64))
    assert not bool(ok[int(top.argmax())])


def test_semi_circular_lanczos_survives_breakdown_and_edge_cases():
    """A conv whose Gram blocks are multiples of the identity (one tap per axis): Lanczos
    breaks down at once, and must still give the exact value."""
    w = np.zeros((2, 2, 1, 1))
    w[0, 0] = w[1, 1] = 3.0
    assert 3.0 <= S.semi_circular_norm(w, (7, 5), (1, 1), (0,) * 4, (1, 1), 1, 100) <= 3.0001
    assert S.semi_circular_norm(np.zeros((2, 2, 3, 3)), (4, 4), (1, 1), (1,) * 4, (1, 1), 1,
                                100) == 0.0
    bad = np.ones((2, 2, 3, 3))
    bad[0, 0, 1, 1] = np.nan
    assert S.semi_circular_norm(bad, (4, 4), (1, 1), (1,) * 4, (1, 1), 1, 100) is None
    # a side above the limit: no candidate
    assert S.semi_circular_norm(np.ones((8, 8, 3, 3)), (8, 8), (1, 1), (1,) * 4, (1, 1), 1,
                                32) is None


def test_semi_candidate_wins_where_the_exact_one_does_not_fit():
    rng = np.random.default_rng(12)
    op = O.Conv(rng.standard_normal((24, 24, 3, 3)), None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    shape = (1, 24, 5, 5)
    exact = _exact(op, shape)
    value, best, cands = _bound(op, shape, exact_max_cost=0)
    assert best == "semi" and exact <= value < cands["circular"] / 1.01, cands
    # with the exact candidate allowed, the cheapest candidate within 1% of the operator's
    # estimated norm wins: semi when its own estimate is within, else the exact one
    value, best, cands = _bound(op, shape)
    assert exact <= value <= exact * 1.01, cands
    assert best == "semi" or "semi" not in cands or cands["semi"] > exact * 1.01 / 1.02
