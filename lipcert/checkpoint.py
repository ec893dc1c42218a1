"""Checkpoints of a certification run: one JSON line per finished sample, so that an
interrupted run (Ctrl-C, a killed worker, a lost machine) loses nothing.

The first line is a header naming what the results belong to: lipcert's version, the
model's and the data's SHA-256, the method, norm, eps and the method's settings. ``resume``
reads the file back only if the header matches the run being resumed, and says what differs
otherwise. Each later line is one sample (index, per-pair bounds, seconds, worker) or, for a
global method, the pair-bound matrix. Lines are written whole and flushed; a line cut by a
kill is ignored on resume (and overwritten).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import InputError


def data_hash(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (np.ascontiguousarray(x, dtype=np.float64),
                  np.ascontiguousarray(y, dtype=np.int64)):
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def header(model_sha: str | None, data_sha: str, method: str, norm: str, eps: float,
           settings: dict[str, Any]) -> dict[str, Any]:
    return {"lipcert_checkpoint": 1, "lipcert_version": __version__, "model_sha256": model_sha,
            "data_sha256": data_sha, "method": method, "norm": norm, "eps": eps,
            "settings": json.loads(json.dumps(settings, sort_keys=True, default=str))}


def _bounds(value: Any, path: Path) -> np.ndarray:
    """Bounds read back must be numbers >= 0 (inf allowed): NaN, negatives and text are an
    input error, never a radius. The file is trusted beyond that: a smaller number written
    into it by hand would certify more (the self-check's attacks and sampled lower bounds
    still run on every certified sample)."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"--resume: {path} holds bounds that are not numbers") from None
    if array.ndim == 0 or not np.all(array >= 0):  # NaN fails
        raise InputError(f"--resume: {path} holds bounds that are not numbers >= 0")
    return array


class Checkpoint:
    """Append-only JSONL file of finished work; see the module doc."""

    def __init__(self, path: str | Path, head: dict[str, Any], resume: bool):
        self.path = Path(path)
        self.samples: dict[int, list[float]] = {}
        self.pair_bounds: np.ndarray | None = None
        self.resumed = 0  # samples the run took from the file
        if resume:
            if not self.path.is_file():
                raise InputError(f"--resume: {self.path} does not exist (start without "
                                 "--resume to create it)")
            self._read(head)
        elif self.path.exists():
            raise InputError(f"--checkpoint {self.path} already exists: add --resume to "
                             "continue that run, or remove the file to start over")
        self._open(head, fresh=not resume)

    def _read(self, head: dict[str, Any]) -> None:
        lines = self.path.read_text(encoding="utf-8").split("\n")
        try:
            found = json.loads(lines[0])
        except (json.JSONDecodeError, IndexError):
            raise InputError(f"--resume: {self.path} is not a lipcert checkpoint") from None
        if not isinstance(found, dict) or found.get("lipcert_checkpoint") != 1:
            raise InputError(f"--resume: {self.path} is not a lipcert checkpoint")
        differs = [k for k in head if k != "lipcert_version" and found.get(k) != head[k]]
        if differs:
            what = "; ".join(f"{k}: file {found.get(k)!r}, this run {head[k]!r}"
                             for k in differs)
            raise InputError(f"--resume: {self.path} belongs to another run ({what}); resume "
                             "with the same model, data and settings, or start a new file")
        good = [lines[0]]
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut by a kill: it and anything after it are dropped
            good.append(line)
            if isinstance(entry, dict) and "pair_bounds" in entry:
                self.pair_bounds = _bounds(entry["pair_bounds"], self.path)
            elif isinstance(entry, dict) and isinstance(entry.get("index"), int):
                self.samples[entry["index"]] = list(_bounds(entry.get("bounds"), self.path))
            else:
                raise InputError(f"--resume: {self.path} has a line that is neither a sample "
                                 "nor pair bounds; it was not written by lipcert")
        self._keep = good

    def _open(self, head: dict[str, Any], fresh: bool) -> None:
        if fresh:
            self._keep = [json.dumps(head, sort_keys=True)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("\n".join(self._keep) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)  # a valid file at every moment
        self._file = self.path.open("a", encoding="utf-8")

    def add_sample(self, index: int, bounds: list[float], seconds: float, worker: str) -> None:
        self.samples[index] = list(bounds)
        self._write({"index": index, "bounds": list(bounds), "seconds": round(seconds, 4),
                     "worker": worker})

    def add_pair_bounds(self, bounds: np.ndarray) -> None:
        self.pair_bounds = np.asarray(bounds, dtype=np.float64)
        self._write({"pair_bounds": self.pair_bounds.tolist()})

    def _write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
