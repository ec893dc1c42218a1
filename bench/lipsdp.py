"""Benchmark: LipSDP bound and wall time (build, solve, check separately) for random ReLU
MLPs of growing width and depth, every form and multiplier proposer, and the bundled digits
MLP. Bounds are certified values (the certificate check is timed as "check").

    python bench/lipsdp.py [--max-width 64] [--time-limit 60] [--solvers clarabel,scs,firstorder]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import numpy as np

from lipcert.estimators.lipsdp import (
    _compress,
    certify_multipliers,
    rescale,
    solve_lipsdp,
)


def random_mlp(n_in: int, widths: list[int], n_out: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [n_in, *widths, n_out]
    return [rng.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(sizes, sizes[1:],
                                                                       strict=False)]


def run(weights, slopes, form, solver, time_limit):
    t0 = time.perf_counter()
    scaled, factor = rescale(weights)
    compressed = _compress(scaled)
    t1 = time.perf_counter()
    lam, info = solve_lipsdp(compressed, slopes, form, solver, time_limit)
    t2 = time.perf_counter()
    rho, how = (None, "no multipliers") if lam is None else \
        certify_multipliers(scaled, slopes, lam)
    t3 = time.perf_counter()
    value = None if rho is None else factor * math.sqrt(rho)
    return value, t1 - t0, t2 - t1, t3 - t2, info["status"], how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-width", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--solvers", default="clarabel,scs,firstorder")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cases = []
    width = 8
    while width <= args.max_width:
        for depth in (1, 2, 4):
            cases.append((f"8-{'-'.join([str(width)] * depth)}-4",
                          random_mlp(8, [width] * depth, 4)))
        width *= 2
    digits = Path(__file__).resolve().parents[1] / "models" / "digits_mlp.onnx"
    if digits.is_file():
        import lipcert
        from lipcert.estimators.chain import dense_chain
        from lipcert.estimators.lipsdp import SLOPE_RESTRICTED

        chain = dense_chain(lipcert.load(digits), "lipsdp", SLOPE_RESTRICTED)
        cases.append(("digits_mlp (64-64-32-10)", chain.weights))
    header = (f"{'network':26} {'neurons':>7} {'form':6} {'solver':10} {'bound':>10} "
              f"{'naive':>9} {'build':>6} {'solve':>7} {'check':>6}  status")
    print(header)
    print("-" * len(header))
    for name, weights in cases:
        naive = float(np.prod([np.linalg.norm(w, 2) for w in weights]))
        slopes = [(0.0, 1.0)] * (len(weights) - 1)
        neurons = sum(w.shape[0] for w in weights[:-1])
        for form in ("neuron", "layer"):
            for solver in args.solvers.split(","):
                if solver != "firstorder" and neurons > 128:
                    print(f"{name:26} {neurons:7d} {form:6} {solver:10} "
                          "skipped: interior point too slow")
                    continue
                value, tb, ts, tc, status, how = run(weights, slopes, form, solver,
                                                     args.time_limit)
                shown = f"{value:10.4f}" if value is not None else f"{'none':>10}"
                print(f"{name:26} {neurons:7d} {form:6} {solver:10} {shown} {naive:9.4f} "
                      f"{tb:6.2f} {ts:7.2f} {tc:6.3f}  {status}; {how}")


if __name__ == "__main__":
    main()
