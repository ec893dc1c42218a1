"""Cost of the soundness self-check on the bundled models (issue: under 5% of the time).

Runs each command as a user does (`lipcert ...` in a fresh process) with and without
`--no-self-check`, interleaved, best of --repeat runs each, and prints both wall times, the
difference and its share. Run on an idle machine; the shared 2-core machines are noisy, so
the differences (tens of milliseconds) are within noise for single runs.

    python bench/selfcheck.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M = "models"
DATA = f"{M}/digits_test.npz"
COMMANDS = [
    ["bound", f"{M}/digits_mlp.onnx"],
    ["bound", f"{M}/digits_cnn.onnx", "-m", "gram"],
    ["bound", f"{M}/digits_resnet.onnx", "-m", "gram"],
    ["bound", f"{M}/digits_maxmin.onnx", "-n", "inf"],
    ["bound", f"{M}/digits_mlp.onnx", "-m", "local", "-n", "inf", "--input", DATA,
     "--index", "3", "--eps", "0.05", "--domain", "0,1"],
    ["certify", f"{M}/digits_mlp.onnx", "--data", DATA, "--eps", "0.1"],
    ["certify", f"{M}/digits_cnn.onnx", "--data", DATA, "--eps", "0.05", "-m", "gram"],
    ["certify", f"{M}/digits_mlp.onnx", "--data", DATA, "--eps", "0.01", "-n", "inf", "-m",
     "local", "-o", "domain=0,1"],
]


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lipcert.cli", *args], cwd=ROOT, check=True,
                   capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{'command':75} {'checked':>8} {'skipped':>8} {'diff':>7} {'share':>6}")
    shares = []
    for cmd in COMMANDS:
        on, off = [], []
        for _ in range(args.repeat):
            on.append(timed(cmd))
            off.append(timed([*cmd, "--no-self-check"]))
        t_on, t_off = min(on), min(off)
        shares.append((t_on - t_off) / t_on)
        label = " ".join(cmd)[:75]
        print(f"{label:75} {t_on:8.2f} {t_off:8.2f} {t_on - t_off:7.3f} "
              f"{100 * shares[-1]:5.1f}%")
    print(f"largest share {100 * max(shares):.1f}%")


if __name__ == "__main__":
    main()
