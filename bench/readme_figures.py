"""Re-run the README's own commands and print where its figures differ from a fresh run.

Every figure the README states comes with a comment right after it:

    <!-- check: 95.3% :: lipcert certify MODEL ... :: summary.certified_accuracy -->

(the figure as written, the command, and where the value is in the command's ``--json``
output; ``tol=5%`` after the path widens the tolerance for values that depend on a time
budget). This script finds those comments, runs each command once with ``--json`` to a
temporary file, and prints the README's figure, the measured value, the relative difference
and the seconds the command took. Commands on ``../shared`` models are skipped when that
folder is absent. Exit code 1 when a figure is off (outside half a unit of its last shown
digit, or its tolerance), so a release can gate on it.

Usage: ``python bench/readme_figures.py [--readme README.md] [--only TEXT]``. Run it on an
idle machine: the time-budgeted methods (lipsdp's SCS share, local's branch-and-bound) give
looser bounds when the machine is busy.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = re.compile(r"<!-- check: (?P<value>.+?) :: (?P<cmd>lipcert .+?) :: (?P<path>\S+)"
                   r"(?: tol=(?P<tol>[0-9.]+)%)? -->")


@dataclass(frozen=True)
class Figure:
    text: str
    command: str
    path: str
    tolerance: float | None

    def value(self) -> float:
        """The figure as a number: 95.3% -> 0.953, 164,840 -> 164840, 1.2e5 -> 120000."""
        text = self.text.replace(",", "").strip()
        if text.endswith("%"):
            return float(text[:-1]) / 100
        return float(text)

    def allowed(self) -> float:
        """Relative difference allowed: the tolerance, or half a unit in the last digit."""
        if self.tolerance is not None:
            return self.tolerance / 100
        digits = self.text.replace(",", "").rstrip("%").lower().split("e")[0]
        decimals = len(digits.split(".")[1]) if "." in digits else 0
        unit = 10.0 ** -decimals
        if "e" in self.text.lower():
            unit *= 10.0 ** int(self.text.lower().split("e")[1])
        if self.text.endswith("%"):
            unit /= 100
        return 0.5 * unit / abs(self.value()) if self.value() else 0.0


def figures(readme: Path) -> list[Figure]:
    return [Figure(m["value"], " ".join(m["cmd"].split()), m["path"],
                   float(m["tol"]) if m["tol"] else None)
            for m in CHECK.finditer(readme.read_text())]


def lookup(payload, path: str) -> float:
    """``results.0.upper`` or ``summary.certified_accuracy_at.0.05`` (keys may hold dots)."""
    node, parts = payload, path.split(".")
    while parts:
        if isinstance(node, list):
            node, parts = node[int(parts[0])], parts[1:]
            continue
        for k in range(len(parts), 0, -1):  # the longest key that exists
            key = ".".join(parts[:k])
            if key in node:
                node, parts = node[key], parts[k:]
                break
        else:
            raise KeyError(path)
    return float(node)


def run(command: str, cache: dict) -> tuple[dict | None, float, str]:
    if command in cache:
        return cache[command]
    args = shlex.split(command)
    missing = [a for a in args if a.startswith("../shared") and not (ROOT / a).exists()]
    if missing:
        cache[command] = (None, 0.0, f"skipped: {missing[0]} is absent")
        return cache[command]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lipcert.cli", *args[1:], "--json",
                               str(out)], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if proc.returncode not in (0, 1) or not out.exists():
            why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            cache[command] = (None, seconds, f"exit {proc.returncode}: {why}")
        else:
            cache[command] = (json.loads(out.read_text()), seconds, "")
    return cache[command]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    parser.add_argument("--only", default="", help="only commands containing this text")
    args = parser.parse_args()
    found = [f for f in figures(Path(args.readme)) if args.only in f.command]
    if not found:
        print("no <!-- check: ... --> comments found")
        return 1
    cache: dict = {}
    off = 0
    print(f"{'README':>12} {'measured':>12} {'diff':>8} {'allowed':>8} {'s':>6}  command")
    for fig in found:
        payload, seconds, why = run(fig.command, cache)
        if payload is None:
            print(f"{fig.text:>12} {'-':>12} {'-':>8} {'-':>8} {seconds:6.1f}  {fig.command}"
                  f"  [{why}]")
            off += why.startswith("exit")
            continue
        measured = lookup(payload, fig.path)
        diff = abs(measured - fig.value()) / abs(fig.value()) if fig.value() else abs(measured)
        bad = not diff <= fig.allowed()  # NaN is off
        off += bad
        print(f"{fig.text:>12} {measured:>12.6g} {diff:>8.2%} {fig.allowed():>8.2%} "
              f"{seconds:6.1f}  {fig.command}{'   <-- differs' if bad else ''}")
    print(f"{len(found)} figures, {off} off")
    return 1 if off else 0


if __name__ == "__main__":
    sys.exit(main())
