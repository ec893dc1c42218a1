"""Seconds from SIGINT to exit for long runs of each command (the issue asks for 2 s).

    python bench/interrupt.py [--after 8]

The same runs as tests/test_interrupts.py: bound -m lipsdp (inside SCS), certify -m lipsdp
and compare (a method in a child process), each interrupted --after seconds in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_interrupts import LONG_RUNS, interrupt  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=float, default=8.0)
    args = parser.parse_args()
    print(f"{'run':>16} {'exit':>5} {'s to exit':>10} {'stdout':>12}")
    for name, cmd in sorted(LONG_RUNS.items()):
        code, out, _, latency, running = interrupt(cmd, args.after)
        shown = "empty" if not out.strip() else f"{len(out)} bytes"
        note = "" if running else "  (finished before the interrupt)"
        print(f"{name:>16} {code:>5} {latency:>10.2f} {shown:>12}{note}", flush=True)


if __name__ == "__main__":
    main()
