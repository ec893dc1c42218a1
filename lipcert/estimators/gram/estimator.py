"""The ``gram`` estimator: Gram-iteration spectral bounds per layer, composed along the DAG.

Per layer it returns the minimum of the sound candidates and says which won:
- ``circular``: the norm of the circular embedding of the zero-padded, strided conv, from
  its DFT blocks (Delattre et al., ICML 2023, Sec. 4): their largest norm, certified by a
  batched Cholesky test just above LAPACK's eigenvalues of the leading blocks
  (``spectral=eigh``, the default), or ``gram``: Gram iteration on every block
  (``spectral=gram``); see :mod:`.core`;
- where the circular candidate is more than ``tighten_above`` (1%) above a Lanczos estimate
  of the operator's norm (few positions: the circular embedding is loosest), cheapest first:
  ``semi``, the embedding that is circular along one spatial axis and exact along the other
  (:mod:`.semi_circular`: frequency blocks of side C n, banded, certified by a Cholesky
  factorisation by blocks), when its own estimate is within ``tighten_above``; else
  ``exact``, the operator's own norm (:mod:`.exact_banded`: one axis unrolled exactly, the
  Gram matrix banded along the other, certified the same way) when that factorisation
  costs at most ``exact_max_cost`` multiply-adds;
- ``unrolled``: the exact SVD of a small unrolled ConvTranspose or AvgPool;
- ``reshaped`` / ``taps``: the size-independent bounds of the naive estimator (for a
  ConvTranspose; for a conv the circular candidate is never above them);
- ``1x1``: the exact norm of the channel matrix of a 1x1 convolution.
Dense layers use the exact SVD (Gram iteration beyond the SVD size limit). A residual Add
whose branches are linear convolutions of one value (or that value itself) is bounded as one
merged conv, ||I + W|| instead of 1 + ||W||. l2 only: linf norms are exact already in naive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...ir import evaluate
from ...ir import ops as O
from ...ir.graph import Graph, Node
from ...rounding import mul_up
from ...soundness import checked, poison
from ..base import Bound, Estimator, cached_factor, options_key, register
from ..common import norms as N
from ..naive import MULTI, UNARY, propagate
from ..settings import setting
from . import exact_banded
from .core import SPECTRAL, conv_circular_bound, dense_gram_bound
from .semi_circular import plan, semi_circular_norm

UNROLL_MIN_SIDE = 1024
UNROLL_MAX_ENTRIES = 4_000_000
#: multiply-adds of the exact candidate's banded factorisation: 3e11 (a 256-channel 3x3
#: conv at 8x8) took 8 s on a 2-core CPU, 1.2e11 (512 channels at 4x4) 5 s
EXACT_MAX_COST = 4e11
#: a semi-circular candidate (exact along one axis) when its smaller side is at most this
SEMI_MAX_SIDE = 4096
#: the tighter candidates are tried only when the circular one is above the operator's
#: estimated norm by this much (relative): each costs seconds on a 256-channel layer
TIGHTEN_ABOVE = 1e-2
#: once its own estimate is in hand, the semi candidate is certified when it gains this much
SEMI_GAIN = 1e-3
#: tolerance of the Lanczos estimate that gates them (ARPACK's; measured within 0.1%)
GATE_TOL = 1e-2


def _circular(weight, in_hw, stride, pads, dilation, groups, options) -> tuple[str, float]:
    spectral = options.get("spectral", "eigh")
    value = conv_circular_bound(weight, in_hw, stride, pads, dilation, groups,
                                int(options.get("iterations", 10)),
                                options.get("device", "cpu"), spectral)
    return ("circular" if spectral == "eigh" else "gram"), value


def _unrolled_norm(op: O.Op, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                   options: dict) -> float | None:
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    if min(n_in, n_out) > options.get("unroll_min_side", UNROLL_MIN_SIDE) or \
            n_in * n_out > options.get("unroll_max_entries", UNROLL_MAX_ENTRIES):
        return None
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *in_shape[1:])
    with torch.no_grad():
        out = evaluate.apply(op, eye)
    if op.linear and getattr(op, "bias", None) is not None:
        with torch.no_grad():
            out = out - evaluate.apply(op, torch.zeros((1, *in_shape[1:]), dtype=torch.float64))
    return N.spectral_norm(out.reshape(n_in, -1).numpy().T)


def _conv_candidates(op: O.Conv, in_shape, out_shape, options) -> dict[str, float]:
    """The circular candidate; where the operator's estimated norm is more than
    ``tighten_above`` below it, the tighter ones, cheapest first: the semi-circular
    candidate when its own estimate shows it within ``tighten_above`` of the operator's,
    else (or when it is not within that once certified) the exact one if its factorisation
    costs at most ``exact_max_cost``; the semi-circular one after all when the exact one
    does not fit. The size-independent bounds of naive (reshaped kernel, sum of taps) are
    never below the circular one (each DFT block is a phase-weighted sum of the taps), so
    they are not computed. A 1x1 conv gets its channel matrix's norm."""
    if op.weight.shape[2:] == (1, 1):
        per = op.weight.shape[0] // op.groups
        return {"1x1": max(N.spectral_norm(op.weight[g * per:(g + 1) * per, :, 0, 0])
                           for g in range(op.groups))}
    name, circular = _circular(op.weight, in_shape[2:], op.stride, op.pads, op.dilation,
                               op.groups, options)
    cands = {name: circular}
    max_cost = float(options.get("exact_max_cost", EXACT_MAX_COST))
    semi_side = int(options.get("semi_max_side", SEMI_MAX_SIDE))
    geometry = (in_shape[2:], op.stride, op.pads, op.dilation, op.groups)
    exact_plan = exact_banded.plan(op.weight.shape, *geometry)
    exact_fits = exact_plan is not None and exact_plan["cost"] <= max_cost
    semi_plan = plan(op.weight.shape, *geometry)
    semi_fits = semi_plan is not None and semi_plan["side"] <= semi_side
    if not (exact_fits or semi_fits):
        return cands
    # a matrix-free Lanczos estimate of the operator's norm (cheap) shows whether the
    # circular bound has room to tighten; each tighter candidate's own estimate checks again
    # before its factorisations
    gain = float(options.get("tighten_above", TIGHTEN_ABOVE))
    estimate = exact_banded.estimated_norm(op.weight, *geometry, tol=GATE_TOL)
    target = estimate * (1.0 + gain)
    if not circular > target:
        return cands
    device = options.get("device", "cpu")
    if semi_fits:
        # with the exact candidate in reach, semi is worth its factorisations only when its
        # own estimate is within the target
        within = min(circular / (1.0 + SEMI_GAIN), target) if exact_fits else \
            circular / (1.0 + SEMI_GAIN)
        semi = semi_circular_norm(op.weight, *geometry, semi_side, unless_within=within,
                                  device=device)
        if semi is not None:
            cands["semi"] = semi
            if semi <= target:
                return cands
    if exact_fits:
        exact = exact_banded.exact_banded_norm(op.weight, *geometry, max_cost,
                                               unless_within=min(cands.values()) /
                                               (1.0 + SEMI_GAIN))
        if exact is not None:
            cands["exact"] = exact
        elif semi_fits and "semi" not in cands:  # the certificate failed: semi after all
            semi = semi_circular_norm(op.weight, *geometry, semi_side,
                                      unless_within=circular / (1.0 + SEMI_GAIN),
                                      device=device)
            if semi is not None:
                cands["semi"] = semi
    return cands


def _conv_transpose_candidates(op: O.ConvTranspose, in_shape, out_shape, options):
    # ConvTranspose = crop . (adjoint of a valid conv with the same weight on the full output)
    kh, kw = op.weight.shape[2:]
    full = tuple((n - 1) * s + (k - 1) * d + 1 + p for n, s, k, d, p in
                 zip(in_shape[2:], op.stride, (kh, kw), op.dilation, op.output_padding,
                     strict=True))
    cands: dict[str, float] = {}
    cheap, how = N.conv_l2_cheap(op.weight, op.stride, op.dilation, op.groups)
    cands["taps" if "tap" in how else "reshaped"] = cheap
    name, value = _circular(op.weight, full, op.stride, (0, 0, 0, 0), op.dilation, op.groups,
                            options)
    cands[name] = value
    exact = _unrolled_norm(op, in_shape, out_shape, options)
    if exact is not None:
        cands["unrolled"] = exact
    return cands


def _avg_pool_candidates(op: O.AvgPool, in_shape, out_shape, options):
    l2, _ = N.nonnegative_linear_norms(op, in_shape)
    cands = {"schur": l2}
    plain = O.AvgPool(op.kernel, op.stride, op.pads, False, op.count_include_pad)
    same_as_conv = (op.count_include_pad or not any(op.pads)) and \
        tuple(evaluate.apply(plain, torch.zeros(in_shape, dtype=torch.float64)).shape) == \
        tuple(out_shape)
    if same_as_conv:  # a depthwise conv with one constant kernel: its norm is the 1-channel one
        kernel = np.full((1, 1, *op.kernel), 1.0 / (op.kernel[0] * op.kernel[1]))
        name, value = _circular(kernel, in_shape[2:], op.stride, op.pads, (1, 1), 1, options)
        cands[name] = value
    exact = _unrolled_norm(op, in_shape, out_shape, options)
    if exact is not None:
        cands["unrolled"] = exact
    return cands


def _dense_candidates(op: O.Dense, in_shape, out_shape, options):
    if min(op.weight.shape) <= N.DENSE_SVD_LIMIT:
        return {"svd": N.spectral_norm(op.weight)}
    return {"gram": dense_gram_bound(op.weight, int(options.get("iterations", 10)),
                                     options.get("device", "cpu"))}


CANDIDATES = {
    O.Conv: _conv_candidates,
    O.ConvTranspose: _conv_transpose_candidates,
    O.AvgPool: _avg_pool_candidates,
    O.Dense: _dense_candidates,
}


def _residual_terms(node: Node, graph: Graph) -> tuple[str, list, float] | None:
    """(s, [(coeff, conv)], identity coefficient) when every input of the Add is a conv of
    one value s used only here, or s itself; else None."""
    users = graph.consumers()
    src, convs, identity = None, [], 0.0
    for coeff, value in zip(node.op.coeffs, node.inputs, strict=True):
        prod = None if value == graph.input else graph.producer(value)
        if prod is not None and isinstance(prod.op, O.Conv) and len(users[value]) == 1:
            s = prod.inputs[0]
            convs.append((coeff, prod.op))
        else:
            s = value
            identity += coeff
        if src not in (None, s):
            return None
        src = s
    return (src, convs, identity) if convs else None


def _tap_offsets(c: O.Conv, axis: int, dilation: tuple[int, int]) -> tuple[int, int]:
    """First and last tap offset of a conv relative to the input position (a d - pad)."""
    k, d, p = c.weight.shape[2 + axis], dilation[axis], c.pads[axis]
    return -p, (k - 1) * d - p


def _merged_window(convs: list, identity: float, dilation: tuple[int, int]):
    """Leading pads and kernel sizes of one conv covering every branch's taps, or None."""
    merged_pads, sizes = [], []
    for axis in (0, 1):
        lows = [_tap_offsets(c, axis, dilation)[0] for _, c in convs] + ([0] if identity else [])
        highs = [_tap_offsets(c, axis, dilation)[1] for _, c in convs] + \
            ([0] if identity else [])
        lo, hi = min(lows), max(highs)
        if any((o - lo) % dilation[axis] for o in lows):
            return None
        merged_pads.append(-lo)
        sizes.append((hi - lo) // dilation[axis] + 1)
    return (merged_pads, sizes) if min(merged_pads) >= 0 else None


def merged_residual_conv(node: Node, graph: Graph) -> tuple[str, O.Conv] | None:
    """An Add of linear convs of one value s (each used only here) and of s itself, as one
    Conv on s (same stride and dilation; s itself needs stride 1): the exact merged operator,
    e.g. I + W for a residual block with a linear branch."""
    if not isinstance(node.op, O.Add):
        return None
    terms = _residual_terms(node, graph)
    if terms is None:
        return None
    src, convs, identity = terms
    stride, dilation = convs[0][1].stride, convs[0][1].dilation
    if any(c.stride != stride or c.dilation != dilation or c.groups != 1 for _, c in convs):
        return None
    c_out, c_in = convs[0][1].weight.shape[:2]
    if identity and (stride != (1, 1) or c_out != c_in):
        return None
    window = _merged_window(convs, identity, dilation)
    if window is None:
        return None
    merged_pads, sizes = window
    kernel = np.zeros((c_out, c_in, *sizes))
    for coeff, c in convs:
        a0 = (_tap_offsets(c, 0, dilation)[0] + merged_pads[0]) // dilation[0]
        b0 = (_tap_offsets(c, 1, dilation)[0] + merged_pads[1]) // dilation[1]
        kernel[:, :, a0:a0 + c.weight.shape[2], b0:b0 + c.weight.shape[3]] += coeff * c.weight
    if identity:
        kernel[np.arange(c_out), np.arange(c_in), merged_pads[0] // dilation[0],
               merged_pads[1] // dilation[1]] += identity
    pads = []
    for axis, (n, out) in enumerate(zip(graph.shape_of(src)[2:], node.shape[2:], strict=True)):
        k_eff = (sizes[axis] - 1) * dilation[axis] + 1
        end = (out - 1) * stride[axis] + k_eff - n - merged_pads[axis]
        if end < 0:
            return None
        pads.append(end)
    merged = O.Conv(kernel, None, stride, (merged_pads[0], merged_pads[1], pads[0], pads[1]),
                    dilation, 1)
    return src, merged


@dataclass(frozen=True)
class GramSettings:
    spectral: str = setting("eigh", "norm of each DFT block of a circular embedding: eigh "
                                    "(exact, batched eigenvalues with error margin) or gram "
                                    "(Gram iteration)", choices=SPECTRAL)
    iterations: int = setting(10, "Gram iterations per frequency block with spectral=gram "
                                  "(the bound decreases with each)", minimum=1)
    exact_max_cost: float = setting(EXACT_MAX_COST, "certified norm of the conv operator "
                                                    "itself (banded Cholesky of its Gram "
                                                    "matrix) when that costs at most this "
                                                    "many multiply-adds", minimum=0.0)
    semi_max_side: int = setting(SEMI_MAX_SIDE, "the circular embedding of one axis only "
                                                "(exact along the other), when its smaller "
                                                "side is at most this", minimum=0)
    tighten_above: float = setting(TIGHTEN_ABOVE, "try the exact and semi candidates only "
                                                  "when the circular bound is above the "
                                                  "operator's estimated norm by this "
                                                  "fraction", minimum=0.0)
    unroll_min_side: int = setting(UNROLL_MIN_SIDE, "exact SVD of an unrolled ConvTranspose "
                                                    "or AvgPool when its smaller side is at "
                                                    "most this", minimum=0)
    unroll_max_entries: int = setting(UNROLL_MAX_ENTRIES, "... and it has at most this many "
                                                          "entries", minimum=0)


@register
class GramEstimator(Estimator):
    name = "gram"
    settings = GramSettings
    summary = ("spectral bounds for convolutions (circular embedding, sound for zero padding "
               "and stride; certified exact norm for small inputs), exact SVD for dense "
               "layers, merged linear residuals")
    norms = ("2",)
    handlers = {**UNARY, **MULTI}

    def layer_bound(self, op: O.Op, in_shape, out_shape, options) -> tuple[float, str, dict]:
        def compute():
            cands = {name: checked(v, f"gram's {name} candidate for a {op.kind} layer")
                     for name, v in CANDIDATES[type(op)](op, in_shape, out_shape,
                                                         options).items()}
            best = min(cands, key=cands.get)
            return cands[best], best, cands

        return cached_factor(op, (self.name, tuple(in_shape), options_key(options)), compute)

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:
        def factor(node: Node, in_shape):
            if type(node.op) in CANDIDATES:
                value, best, cands = self.layer_bound(node.op, in_shape, node.shape, options)
                value = poison("gram.layer", value)
                return value, f"{best} (" + ", ".join(f"{k}={v:.6g}" for k, v in
                                                      cands.items()) + ")"
            return UNARY[type(node.op)](node.op, node, in_shape, norm)

        merges: list[dict] = []

        def combine(node: Node, lip: dict[str, float]) -> float | None:
            found = merged_residual_conv(node, graph)
            if found is None:
                return None
            src, conv = found
            value, best, _ = self.layer_bound(conv, graph.shape_of(src), node.shape, options)
            value = checked(poison("gram.layer", value), f"gram's merged residual at "
                                                          f"{node.source!r}")
            plain = MULTI[O.Add](node.op, [lip[i] for i in node.inputs], norm)
            merged = mul_up(value, lip[src])
            merges.append({"node": node.source, "merged": merged, "separate": plain,
                           "how": best})
            return min(merged, plain)

        value, layers = propagate(graph, norm, factor, combine)
        return Bound(method=self.name, norm=norm, upper=value,
                     details={"layers": layers, "iterations": int(options.get("iterations", 10)),
                              "residual_merges": merges})



