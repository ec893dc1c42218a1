"""Ctrl-C: bound (inside SCS, which catches SIGINT itself), certify and compare (a method
running in a child process) stop with exit 130, one line, and nothing partial on stdout.
The wait is a hang detector, not a timing assertion; bench/interrupt.py measures latency."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import MODELS

MLP, DATA = str(MODELS / "digits_mlp.onnx"), str(MODELS / "digits_test.npz")
LONG_RUNS = {  # each takes well over the wait below when not interrupted
    "bound-lipsdp": ["bound", MLP, "-m", "lipsdp", "-o", "solver=scs", "-o", "time_limit=inf",
                     "--json", "-"],
    "certify-lipsdp": ["certify", MLP, "--data", DATA, "--eps", "0.01", "-m", "lipsdp",
                       "--json", "-"],
    # linf: lipsdp solves one SDP per output (l2 compare finished in about 8 s, at the wait)
    "compare": ["compare", MLP, "--norm", "inf", "--methods", "naive,lipsdp", "--json", "-"],
}


def interrupt(args: list[str], after_s: float) -> tuple[int, str, str, float, bool]:
    proc = subprocess.Popen([sys.executable, "-m", "lipcert.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after_s)
    running = proc.poll() is None
    proc.send_signal(signal.SIGINT)
    sent = time.perf_counter()
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err, time.perf_counter() - sent, running


@pytest.mark.parametrize("case", sorted(LONG_RUNS))
def test_ctrl_c_stops_with_exit_130(case):
    code, out, err, latency, running = interrupt(LONG_RUNS[case], after_s=8.0)
    assert running, f"{case} finished before the interrupt; make the run longer"
    assert code == 130, (code, out[-500:], err[-500:])
    assert err.strip().splitlines()[-1] == "lipcert: interrupted", err[-500:]
    if out.strip():  # nothing, or complete JSON
        json.loads(out)
    print(f"{case}: exit 130 {latency:.2f} s after SIGINT")
