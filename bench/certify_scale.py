"""Samples per second of `certify --method local` serially, with --workers N and with
--ray (a local Ray instance of N CPUs; skipped without Ray).

Runs the CLI on the bundled digits models (local bounds on each sample's box, with and
without branch-and-bound) and prints, per mode, the wall time, samples per second, the
speed-up against serial, and the distributed overhead per sample (the gap to the ideal
serial / N). Process start-up (torch import) is included, as a user sees it. Usage:
``python bench/certify_scale.py [--workers 2] [--samples 200] [--chunks]`` (``--chunks``:
the samples per task, 1 to 64, instead). On a shared, noisy 2-core
machine compare the modes within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CASES = [("digits_mlp", ["-o", "bab_time=0"]), ("digits_mlp", ["-o", "bab_time=0.05"]),
         ("digits_mlp", ["-o", "bab_time=0.25"]),
         ("digits_cnn", ["-o", "bab_time=0"])]


def run(model: str, extra: list[str], data: Path, workers: int, ray: bool = False,
        chunk: int | None = None) -> float:
    args = [sys.executable, "-m", "lipcert.cli", "certify", str(ROOT / "models" / f"{model}.onnx"),
            "--data", str(data), "--eps", "0.01", "-n", "inf", "-m", "local", "-o",
            "domain=0,1", *extra, "--no-self-check"]
    if workers > 1:
        args += ["--workers", str(workers)]
    if ray:  # a local Ray instance with ``workers`` CPUs, started by the run
        args += ["--ray"]
    env = dict(os.environ, **({"LIPCERT_CHUNK_SIZE": str(chunk)} if chunk else {}))
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--chunks", action="store_true",
                        help="only the chunk-size scan (--workers N, bab_time=0.05)")
    opts = parser.parse_args()
    full = np.load(ROOT / "models" / "digits_test.npz")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "d.npz"
        np.savez(data, x=full["x"][:opts.samples], y=full["y"][:opts.samples])
        if opts.chunks:
            print(f"{'chunk':>5} {'s':>7} {'samples/s':>10}  (digits_mlp, bab_time=0.05, "
                  f"--workers {opts.workers})")
            for chunk in (1, 4, 16, 64):
                seconds = run("digits_mlp", ["-o", "bab_time=0.05"], data, opts.workers,
                              chunk=chunk)
                print(f"{chunk:>5} {seconds:7.1f} {opts.samples / seconds:10.1f}")
            return
        print(f"{'model':<11} {'settings':<14} {'mode':<10} {'s':>7} {'samples/s':>10} "
              f"{'speed-up':>9} {'overhead/sample':>16}")
        for model, extra in CASES:
            serial = run(model, extra, data, 1)
            modes = [("serial", serial),
                     (f"workers {opts.workers}", run(model, extra, data, opts.workers))]
            if importlib.util.find_spec("ray") is not None:
                modes.append((f"ray {opts.workers}", run(model, extra, data, opts.workers,
                                                         ray=True)))
            ideal = serial / opts.workers
            for mode, seconds in modes:
                over = (seconds - ideal) / opts.samples if mode != "serial" else 0.0
                print(f"{model:<11} {' '.join(extra[1:]):<14} {mode:<10} {seconds:7.1f} "
                      f"{opts.samples / seconds:10.1f} {serial / seconds:9.2f} "
                      f"{over * 1000:13.1f} ms")


if __name__ == "__main__":
    main()
