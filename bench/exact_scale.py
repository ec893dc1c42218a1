"""How long HiGHS takes on the LipMIP program as the number of unstable ReLUs grows.

Random 10-h-h-3 ReLU nets on the box [-1, 1]^10; prints, per width, the unstable ReLUs, the
seconds for output 0 and HiGHS's status. This is what ``exact``'s ``max_unstable`` default
is set from. Usage: ``python bench/exact_scale.py [TIME_LIMIT_S]`` (default 30).
"""

from __future__ import annotations

import sys
import time

import numpy as np

from lipcert.errors import MethodNotApplicable
from lipcert.estimators.exact import interval_bounds, lipmip_output


def main() -> None:
    limit = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    rng = np.random.default_rng(0)
    print(f"{'width':>5} {'unstable':>8} {'seconds':>8}  status")
    for width in (5, 10, 15, 20, 30):
        n = 10
        layers = [(rng.normal(size=(width, n)) / np.sqrt(n), rng.normal(size=width) * 0.1),
                  (rng.normal(size=(width, width)) / np.sqrt(width),
                   rng.normal(size=width) * 0.1),
                  (rng.normal(size=(3, width)) / np.sqrt(width), np.zeros(3))]
        low, high = -np.ones(n), np.ones(n)
        unstable = sum(int(((zl < 0) & (zu > 0)).sum())
                       for zl, zu in interval_bounds(layers, low, high))
        start = time.perf_counter()
        try:
            status = lipmip_output(layers, low, high, 0, limit)[2]
        except MethodNotApplicable as exc:
            status = str(exc)
        print(f"{width:>5} {unstable:>8} {time.perf_counter() - start:>8.2f}  {status[:60]}",
              flush=True)


if __name__ == "__main__":
    main()
