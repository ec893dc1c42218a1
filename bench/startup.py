"""Start-up cost of the CLI: `lipcert --help` must stay lazy (about 0.1 s: no torch, cvxpy,
scipy or plotting import), the cost of a whole naive bound on a bundled model, and of a
compare of two quick methods (its methods run in a child process: what that costs).

    python bench/startup.py [--repeat 5] [--root CHECKOUT]

Prints the best of --repeat runs of each command in a fresh process, and which heavy modules
`--help` imported (none expected).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["--help"], ["bound", "--help"], ["methods"],
            ["bound", "models/digits_mlp.onnx", "--no-self-check"],
            ["bound", "models/digits_mlp.onnx"],
            ["compare", "models/digits_mlp.onnx", "--methods", "naive,gram"]]
HEAVY = ("torch", "cvxpy", "scipy", "onnxruntime", "matplotlib")


def best(args: list[str], repeat: int, root: Path = ROOT) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lipcert.cli", *args], cwd=root, check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="a checkout to time (e.g. a git worktree of an older commit)")
    args = parser.parse_args()
    baseline = best(["--version"], args.repeat, args.root)
    print(f"{'command':55} {'seconds':>8}")
    print(f"{'lipcert --version':55} {baseline:8.3f}")
    for cmd in COMMANDS:
        print(f"{'lipcert ' + ' '.join(cmd):55} {best(cmd, args.repeat, args.root):8.3f}")
    probe = ("import sys, lipcert.cli as c\n"
             "try:\n    c.cli(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
             f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip().splitlines()[-1]
    print(f"heavy modules imported by --help: {out}")


if __name__ == "__main__":
    main()
