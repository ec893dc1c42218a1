"""The ``lipsdp`` estimator: LipSDP (Fazlyab, Robey, Hassani, Morari, Pappas, NeurIPS 2019)
for chains of dense layers and slope-restricted activations, l2 norm.

With z = [x_0; x_1; ...; x_{l-1}], A = [blkdiag(W_1..W_{l-1}), 0] (pre-activations) and
B = [0, I] (post-activations), LipSDP solves (their Theorem 2)
    min rho  s.t.  M = [A; B]^T [[-2 a b T, (a + b) T], [(a + b) T, -2T]] [A; B]
                       + blkdiag(-rho I, 0, ..., 0, W_l^T W_l)  <= 0,   T diagonal >= 0,
and L = sqrt(rho). Forms: ``neuron`` (one multiplier per neuron, default) and ``layer``
(one per layer). Biases cancel. The "LipSDP-Network" coupling is unsound and not offered.

The solver only proposes T. The printed bound comes from :mod:`sdp_certificate`: T clipped
to >= 0, rho* from the Schur complement on the *uncompressed* problem, a margin, and a
Cholesky proof of -M > 0 that accounts for float64 rounding. If that fails we try the other
form's multipliers, then give no bound and say why; the solver's objective is never printed.
The SDP itself is solved on the compressed input (W_1^T = QR, W_1 -> R^T: exact in real
arithmetic), which keeps it small when the input is wide.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import MethodNotApplicable
from ...ir import ops as O
from ...ir.chain import DenseChain, dense_chain
from ...ir.graph import Graph
from ...ir.lowering import CHAIN_LINEAR_OPS, UNROLLABLE
from ...ir.residual import residual_parts
from ...rounding import mul_up
from ...soundness import checked, poison
from ..base import Bound, Estimator, register
from ..settings import setting
from .lmi import GroupQC
from .subchains import affine_norm, bound_subchain, split_chain

SLOPE_RESTRICTED = O.ELEMENTWISE_ACTIVATIONS
MAX_NEURONS = 1024
#: unrolled matrix entries (8 bytes each; input identity included): the OVAL21 cifar_wide_kw
#: takes 30.4 million, 2.5 GB peak in all (bench/results/lipsdp.txt)
MAX_ENTRIES = 50_000_000
SOLVERS = ("auto", "barrier", "clarabel", "scs", "firstorder")


def slopes_of(chain: DenseChain) -> list:
    """Each hidden layer's quadratic constraint: (alpha, beta) or a GroupQC."""
    qcs = []
    for act, w in zip(chain.activations, chain.weights, strict=False):
        if isinstance(act, O.GroupSort):
            groups = np.asarray(act.groups, dtype=np.int64)
            if groups.max(initial=-1) >= w.shape[0] or \
                    np.unique(groups).size != groups.size:
                raise MethodNotApplicable("method lipsdp needs GroupSort on the layer's "
                                          "feature axis")
            qcs.append(GroupQC(groups))
        else:
            qcs.append(O.slope_range(act))
    return qcs


@dataclass(frozen=True)
class LipSDPSettings:
    form: str = setting("neuron", "multiplier structure: one per neuron, one per layer, or "
                                  "ECLipsE-Fast's closed form (no solver)",
                        choices=("neuron", "layer", "eclipse-fast"))
    solver: str = setting("auto", "who proposes the multipliers (the certificate decides)",
                          choices=SOLVERS)
    split: int = setting(0, "sub-chains of at most this many hidden layers (0: no split)",
                         minimum=0)
    time_limit: float = setting(60.0, "seconds for all proposers together (inf: solvers stop "
                                      "on their own iteration limits)", minimum=0,
                                exclusive=True, infinite=True)
    max_neurons: int | None = setting(None, f"refuse larger (sub-)chains (default "
                                            f"{MAX_NEURONS}; {8 * MAX_NEURONS} for "
                                            "eclipse-fast, firstorder and l2 with solver auto)",
                                      minimum=1)
    max_entries: int = setting(MAX_ENTRIES, "conv layers are unrolled into matrices up to this "
                                            "many entries (8 bytes each)", minimum=1)


@register
class LipSDPEstimator(Estimator):
    name = "lipsdp"
    settings = LipSDPSettings
    deadline = ("time_limit", 0.7)
    summary = ("LipSDP (Neuron/Layer/ECLipsE-Fast forms, slope-restricted and GroupSort "
               "constraints, l2 and linf) for chains; every printed bound is a float-rigorously "
               "checked certificate")
    norms = ("2", "inf")
    # residual graphs (Add, Concat) are read as blocks; see _residual
    handlers = {O.GroupSort: None, **{op: None for op in (*CHAIN_LINEAR_OPS, *SLOPE_RESTRICTED)},
                **{op: None for op in UNROLLABLE if op not in O.ELEMENTWISE_ACTIVATIONS}}

    def compute(self, graph: Graph, norm: str, **options: Any) -> Bound:
        form = options["form"]  # validated against LipSDPSettings' choices
        if form == "eclipse-fast" and norm != "2":
            raise MethodNotApplicable("lipsdp form eclipse-fast is l2 only; use -o form=neuron "
                                      "for linf")
        if not graph.is_chain():
            return self._residual(graph, norm, form, options)
        chain = dense_chain(graph, self.name, (*SLOPE_RESTRICTED, O.GroupSort),
                            options.get("max_entries", MAX_ENTRIES))
        slopes = slopes_of(chain)
        if not chain.activations:  # affine: exact
            return Bound(method=self.name, norm=norm, upper=affine_norm(chain.weights[0], norm),
                         notes=["affine model: exact operator norm"])
        solver, split = options["solver"], int(options["split"])
        parts = split_chain(chain.weights, slopes, split)
        _check_size(parts, neuron_limit(form, solver, norm, options))
        time_limit = float(options.get("time_limit", 60.0))
        progress = options.get("progress")
        total = 1.0
        details: dict[str, Any] = {"form": form, "solver": solver, "split": split,
                                   "norm": norm, "subchains": []}
        for k, (weights, part_slopes) in enumerate(parts):
            if progress:
                progress(f"setting up sub-chain {k + 1} of {len(parts)}" if len(parts) > 1
                         else "setting up the LMI")
            value, info = bound_subchain(weights, part_slopes, form, solver, time_limit, norm,
                                         progress)
            details["subchains"].append(info)
            if value is not None:
                value = checked(poison("lipsdp.rho", value),
                                f"lipsdp's certified value for sub-chain {k + 1}")
                product = layer_norm_product(weights, part_slopes, norm)
                info["layer_norm_product"] = product
                if product < value:  # both are bounds: keep the smaller, and say so
                    info["certificate"] += ("; the product of the layer norms is smaller and "
                                            "is used")
                    value = product
            if value is None:
                notes = [f"no certificate for sub-chain {k + 1} of {len(parts)}: "
                         f"{info['certificate']}; no bound printed (the solver's objective "
                         "is not a bound)"]
                return Bound(method=self.name, norm=norm, upper=None, notes=notes,
                             details=details)
            total = mul_up(total, value)
            if k < len(parts) - 1:  # the activation between two sub-chains
                qc = slopes[sum(len(pw) for pw, _ in parts[:k + 1]) - 1]
                total = mul_up(total, 1.0 if isinstance(qc, GroupQC)
                               else max(abs(qc[0]), abs(qc[1])))
        if len(parts) == 1:
            details.update({key: v for key, v in details["subchains"][0].items()})
        return Bound(method=self.name, norm=norm, upper=total,
                     notes=_notes(form, norm, len(parts), split, details), details=details)


    def _residual(self, graph: Graph, norm: str, form: str, options: dict[str, Any]) -> Bound:
        """A residual graph: one LMI per part (a residual block y = S x + A sigma(B x + b)
        with the skip in its output map, or a chain between blocks), the bounds
        multiplied (lipcert.ir.residual)."""
        parts = residual_parts(graph, self.name, int(options.get("max_entries", MAX_ENTRIES)))
        items = []
        for part in parts:
            chain = DenseChain(part.weights(), [], part.activations)
            items.append((chain.weights, slopes_of(chain), part))
        hidden = [sum(w.shape[0] for w in ws[:-1]) for ws, _, _ in items]
        _check_size([(ws, sl) for ws, sl, _ in items],
                    neuron_limit(form, options["solver"], norm, options))
        time_limit = float(options.get("time_limit", 60.0))
        progress = options.get("progress")
        details: dict[str, Any] = {"form": form, "solver": options["solver"], "norm": norm,
                                   "residual_parts": []}
        total = 1.0
        budget = [time_limit * h / max(1, sum(hidden)) for h in hidden]
        for k, (weights, slopes, part) in enumerate(items):
            if progress:
                progress(f"residual part {k + 1} of {len(items)}")
            key = _part_key(weights, slopes, form, options["solver"], norm)
            if key in _PART_CACHE:  # e.g. certify's pairs share every part but the last
                value, info = _PART_CACHE[key]
                info = {**info, "cached": True}
            elif not slopes:
                value, info = affine_norm(weights[0], norm), {"certificate": "exact "
                                                                             "operator norm"}
            else:
                value, info = bound_subchain(weights, slopes, form, options["solver"],
                                             max(1.0, budget[k]), norm, progress)
                if value is not None:
                    _PART_CACHE[key] = (value, info)
                    while len(_PART_CACHE) > 64:
                        _PART_CACHE.pop(next(iter(_PART_CACHE)))
            info = {"nodes": f"{part.sources[0]} .. {part.sources[-1]}" if part.sources
                    else "", "skip": part.skip, "bound": value, **info}
            details["residual_parts"].append(info)
            if value is None:
                return Bound(method=self.name, norm=norm, upper=None, details=details,
                             notes=[f"no certificate for residual part {k + 1} of "
                                    f"{len(items)} ({info['nodes']}): {info['certificate']}; "
                                    "no bound printed"])
            value = checked(poison("lipsdp.rho", value),
                            f"lipsdp's certified value for residual part {k + 1}")
            if not part.skip and slopes:
                product = layer_norm_product(weights, slopes, norm)
                if product < value:
                    info["certificate"] += "; the product of the layer norms is smaller"
                    value = product
                    info["bound"] = value
            total = mul_up(total, value)
        skips = sum(p.skip for _, _, p in items)
        notes = [f"residual graph read as {len(items)} parts whose bounds multiply, "
                 f"{skips} of them residual blocks with the skip in the LMI's output map "
                 "(y = S x + A sigma(B x + b): C = [S, A])",
                 "every part's value from a checked certificate"]
        return Bound(method=self.name, norm=norm, upper=total, notes=notes, details=details)


#: certified values of residual parts, by their exact weights and settings (a certified
#: value stays valid whatever time budget found it)
_PART_CACHE: dict[str, tuple[float, dict[str, Any]]] = {}


def _part_key(weights: list[np.ndarray], slopes: list, form: str, solver: str,
              norm: str) -> str:
    digest = hashlib.sha256()
    for w in weights:
        digest.update(repr(w.shape).encode())
        digest.update(np.ascontiguousarray(w, dtype=np.float64).tobytes())
    for qc in slopes:
        digest.update(repr(np.shape(qc.groups)).encode() + np.asarray(qc.groups).tobytes()
                      if isinstance(qc, GroupQC)
                       else repr(tuple(qc)).encode())
    digest.update(f"{form}|{solver}|{norm}".encode())
    return digest.hexdigest()


def layer_norm_product(weights: list[np.ndarray], slopes: list, norm: str) -> float:
    """prod ||W_i|| * prod max(|alpha|, |beta|) (GroupSort: 1), rounded up: the bound every
    LipSDP certificate improves on in exact arithmetic, but that rounding margins can leave
    slightly above it (a chain of orthogonal layers: exactly 1 against 1 + 1e-5)."""
    total = 1.0
    for w in weights:
        total = mul_up(total, affine_norm(w, norm))
    for qc in slopes:
        total = mul_up(total, 1.0 if isinstance(qc, GroupQC) else max(abs(qc[0]), abs(qc[1])))
    return total


def neuron_limit(form: str, solver: str, norm: str, options: dict) -> int:
    """Hidden neurons per (sub-)chain: ``max_neurons`` if set, else 8 MAX_NEURONS where
    every proposer scales as sum_k n_k^3 (ECLipsE-Fast; the first-order method; l2 with
    solver auto, which beyond 600 neurons uses those two), else MAX_NEURONS (a dense SDP
    for cvxpy's solvers or Newton steps of the barrier method)."""
    if options.get("max_neurons") is not None:
        return int(options["max_neurons"])
    scalable = form == "eclipse-fast" or (solver in ("auto", "firstorder") and norm == "2")
    return 8 * MAX_NEURONS if scalable else MAX_NEURONS


def _check_size(parts: list, limit: int) -> None:
    for weights, _ in parts:
        n_hidden = sum(w.shape[0] for w in weights[:-1])
        if n_hidden > limit:
            raise MethodNotApplicable(
                f"method lipsdp refuses {n_hidden} hidden neurons in one (sub-)chain "
                f"(limit {limit}); try -o split=2, -o form=eclipse-fast or -o max_neurons=N")


def _notes(form: str, norm: str, n_parts: int, split: int, details: dict) -> list[str]:
    label = "ECLipsE-Fast" if form == "eclipse-fast" else f"LipSDP-{form.capitalize()}"
    if norm == "inf":
        label += " (linf: diag(tau) input weights, one SDP per output, L^2 <= s sum tau)"
    notes = [f"{label}" + (f" on {n_parts} sub-chains of <= {split} hidden layers, "
                           "multiplied with the boundary activations' max(|alpha|, "
                           "|beta|)" if n_parts > 1 else "")]
    proposers = sorted({name for sc in details["subchains"] for name in sc["proposers"]})
    notes.append(f"multipliers proposed by {', '.join(proposers)}; every value from a "
                 "checked certificate")
    return notes






