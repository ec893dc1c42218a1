"""Benchmark: `certify --method local` with and without a per-sample branch-and-bound budget
on the VNN-COMP 2021 mnistfc instances (MNIST 784-256xK-10, eps 0.03 / 0.05, inputs in
[0, 1]).

The images are read back from the instances' vnnlib files (x = upper - eps where the upper
bound is not clipped at 1, else lower + eps) and their labels from the header comment; the
network from the same folder. Each configuration certifies the same samples in one run:
bab_time 0 (bound propagation only: certify's default) and the given budgets, each sample
stopping early once every class pair meets the bound its radius needs, or once a pair is
provably out of reach. Prints certified counts, time per configuration and per sample.

The instances come from a snapshot of https://github.com/stanleybak/vnncomp2021 (its
benchmarks/mnistfc folder), found at $VNNCOMP2021 or ../.mirror/stanleybak+vnncomp2021/repo
(a bare git directory, read with git show); skipped when absent.

    python bench/certify_bab.py [--net mnist-net_256x2] [--eps 0.03] [--budgets 0,60]
                                [--samples 15] [--shells 8] [--margin off,on]

``--shells``: nested boxes per sample (certify's integral certificate; 1 = the eps box
alone, the certificate before shells); every budget runs with each. ``--margin on,off``:
with and without certify's margin bounds (off: radii from gradient bounds alone, the
Lipschitz certificate); every budget and shell count runs with each.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REPO = ROOT.parent / ".mirror" / "stanleybak+vnncomp2021" / "repo"
FOLDER = "benchmarks/mnistfc"


def _show(repo: Path, path: str) -> bytes:
    return subprocess.run(["git", "--git-dir", str(repo), "show", f"HEAD:{path}"],
                          check=True, capture_output=True).stdout


def read_instance(repo: Path, index: int, eps: float) -> tuple[np.ndarray, int]:
    text = _show(repo, f"{FOLDER}/prop_{index}_{eps:.2f}.vnnlib").decode()
    label = int(re.search(r"label: (\d+)", text).group(1))
    upper = {int(i): float(v) for i, v in re.findall(r"\(<= X_(\d+) ([-0-9.e]+)\)", text)}
    lower = {int(i): float(v) for i, v in re.findall(r"\(>= X_(\d+) ([-0-9.e]+)\)", text)}
    n = len(upper)
    hi = np.array([upper[i] for i in range(n)])
    lo = np.array([lower[i] for i in range(n)])
    x = np.where(hi < 1.0, hi - eps, lo + eps)
    return np.clip(x, 0.0, 1.0), label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--net", default="mnist-net_256x2")
    parser.add_argument("--eps", type=float, default=0.03)
    parser.add_argument("--budgets", default="0,60")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--shells", default="8")
    parser.add_argument("--margin", default="off,on")
    args = parser.parse_args()
    repo = Path(os.environ.get("VNNCOMP2021", DEFAULT_REPO))
    if not repo.exists():
        print(f"skipped: no vnncomp2021 snapshot at {repo} (set VNNCOMP2021)")
        return
    import lipcert
    from lipcert import certify as C

    tmp = tempfile.TemporaryDirectory()  # certify runs onnxruntime on the file itself
    path = Path(tmp.name) / f"{args.net}.onnx"
    path.write_bytes(_show(repo, f"{FOLDER}/{args.net}.onnx"))
    graph = lipcert.load(path)
    pairs = [read_instance(repo, i, args.eps) for i in range(args.samples)]
    x = np.stack([p[0] for p in pairs]).reshape(len(pairs), *graph.input_shape)
    y = np.array([p[1] for p in pairs])
    print(f"{args.net}, eps {args.eps}, {len(y)} instances (VNN-COMP 2021 mnistfc)")
    print(f"{'margin':>6} {'shells':>6} {'bab_time/sample':>16} {'certified':>10} "
          f"{'clean':>6} {'time s':>8} {'s/sample':>9}  per sample (radius / eps)")
    for margin in args.margin.split(","):
        for budget in [float(b) for b in args.budgets.split(",")]:
            for shells in [int(k) for k in args.shells.split(",")]:
                t0 = time.perf_counter()
                cert = C.certify(graph, x, y, eps=args.eps, method="local", norm="inf",
                                 options={"domain": (0.0, 1.0), "bab_time": budget},
                                 shells=shells, margin_bounds=margin == "on")
                elapsed = time.perf_counter() - t0
                n_cert = int(cert.certified(args.eps).sum())
                ratios = " ".join(f"{r / args.eps:.2f}" for r in cert.radii)
                print(f"{margin:>6} {shells:6d} {budget:16g} {n_cert:10d} "
                      f"{int(cert.correct.sum()):6d} {elapsed:8.1f} {elapsed / len(y):9.2f}  "
                      f"{ratios}")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
