"""certify at data-set scale: --workers, --checkpoint and --resume give the same report as
a serial run; a worker killed mid-task has its chunk retried (no sample lost, none counted
twice); an interrupted run resumes without recomputing what the checkpoint holds; a resume
on another run is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import MODELS, killing_task

from lipcert.cli import cli
from lipcert.parallel import run_samples

MLP = MODELS / "digits_mlp.onnx"
LOCAL = ["-n", "inf", "-m", "local", "-o", "domain=0,1", "--eps", "0.01"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    full = np.load(MODELS / "digits_test.npz")
    path = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(path, x=full["x"][:60], y=full["y"][:60])
    return path


def certify(*args) -> tuple[int, dict | None, str]:
    out = args[args.index("--json") + 1] if "--json" in args else None
    result = CliRunner().invoke(cli, ["certify", *map(str, args)])
    payload = json.loads(Path(out).read_text()) if out and result.exit_code in (0, 1) else None
    return result.exit_code, payload, result.output


def same_report(a: dict, b: dict) -> None:
    """The same report: samples (radii to the last bit), summary and pair bounds."""
    assert a["samples"] == b["samples"] and a["summary"] == b["summary"]
    assert a["pair_bounds"] == b["pair_bounds"]


@pytest.fixture(scope="module")
def serial(data, tmp_path_factory):
    """The serial report, with the default thread count."""
    out = tmp_path_factory.mktemp("serial") / "s.json"
    code, payload, output = certify(MLP, "--data", data, *LOCAL, "--json", out)
    assert code == 0, output
    return payload


def test_workers_give_the_serial_report(data, serial, tmp_path, monkeypatch):
    # workers at the parent's thread count do the serial run's arithmetic: the report is
    # identical to the last bit (at the default, the parent's threads divided among the
    # workers, BLAS may block a product differently and a bound moves by an ulp)
    import torch

    monkeypatch.setenv("LIPCERT_WORKER_THREADS", str(torch.get_num_threads()))
    code, payload, output = certify(MLP, "--data", data, *LOCAL, "--workers", "2",
                                    "--json", tmp_path / "w.json")
    assert code == 0, output
    same_report(serial, payload)
    assert any("computed by 2 worker processes" in n for n in payload["notes"])


def test_a_cut_checkpoint_resumes_to_the_same_report(data, serial, tmp_path):
    ckpt = tmp_path / "run.jsonl"
    code, full, output = certify(MLP, "--data", data, *LOCAL, "--checkpoint", ckpt,
                                 "--json", tmp_path / "a.json")
    assert code == 0, output
    same_report(serial, full)
    lines = ckpt.read_text().splitlines()
    n_samples = len(lines) - 1
    assert n_samples == sum(s["margin"] > 0 for s in full["samples"])
    kept = lines[:1 + n_samples // 2]
    ckpt.write_text("\n".join(kept) + "\n" + lines[len(kept)][:25])  # killed mid-write
    code, resumed, output = certify(MLP, "--data", data, *LOCAL, "--checkpoint", ckpt,
                                    "--resume", "--json", tmp_path / "b.json")
    assert code == 0, output
    same_report(serial, resumed)
    indices = [json.loads(line)["index"] for line in ckpt.read_text().splitlines()[1:]]
    assert sorted(indices) == sorted(set(indices)) and len(indices) == n_samples
    assert any(f"{n_samples // 2} samples read back" in n for n in resumed["notes"])


def test_resume_on_another_run_is_refused(data, tmp_path):
    ckpt = tmp_path / "run.jsonl"
    assert certify(MLP, "--data", data, *LOCAL, "--checkpoint", ckpt)[0] == 0
    other = [a if a != "0.01" else "0.02" for a in LOCAL]
    code, _, output = certify(MLP, "--data", data, *other, "--checkpoint", ckpt, "--resume")
    assert code == 2 and "belongs to another run" in output and "eps" in output
    code, _, output = certify(MLP, "--data", data, *LOCAL, "--checkpoint", ckpt)
    assert code == 2 and "already exists" in output and "--resume" in output
    code, _, output = certify(MLP, "--data", data, *LOCAL, "--resume")
    assert code == 2 and "--checkpoint" in output
    ckpt.write_text("not a checkpoint\n")
    code, _, output = certify(MLP, "--data", data, *LOCAL, "--checkpoint", ckpt, "--resume")
    assert code == 2 and "not a lipcert checkpoint" in output


def test_a_killed_worker_loses_no_sample(tmp_path):
    payload = {"kill_at": 7, "marker": str(tmp_path / "killed")}
    seen = [i for i, *_ in run_samples(killing_task, payload, list(range(40)), workers=2)]
    assert (tmp_path / "killed").exists()  # a worker did die
    assert sorted(seen) == list(range(40))  # every sample once


def test_ctrl_c_leaves_a_checkpoint_that_resumes(data, serial, tmp_path):
    ckpt = tmp_path / "run.jsonl"
    args = [sys.executable, "-m", "lipcert.cli", "certify", str(MLP), "--data", str(data),
            *LOCAL, "--workers", "2", "--checkpoint", str(ckpt)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # the output check may create and remove the file once before the run
            if len(ckpt.read_text().splitlines()) > 10:
                break
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    interrupted = proc.poll() is None
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    if interrupted:
        assert proc.returncode == 130
    code, resumed, output = certify(MLP, "--data", data, *LOCAL, "--checkpoint", ckpt,
                                    "--resume", "--json", tmp_path / "r.json")
    assert code == 0, output
    same_report(serial, resumed)  # the first half came from 2 workers
    indices = [json.loads(line)["index"] for line in ckpt.read_text().splitlines()[1:]]
    assert len(indices) == len(set(indices))


def test_global_methods_bound_pairs_in_workers(data, tmp_path):
    args = [MLP, "--data", data, "--eps", "0.05", "-m", "naive"]
    code, serial_naive, output = certify(*args, "--json", tmp_path / "s.json")
    assert code == 0, output
    code, parallel, output = certify(*args, "--workers", "2", "--json", tmp_path / "p.json")
    assert code == 0, output
    same_report(serial_naive, parallel)
    assert any("pair bounds computed by 2 worker" in n for n in parallel["notes"])


def test_ray_gives_the_serial_report(data, serial, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    import torch

    # a local Ray instance with 2 CPUs, started and stopped by the run itself; tasks at the
    # parent's thread count (as test_workers_give_the_serial_report)
    monkeypatch.setenv("LIPCERT_WORKER_THREADS", str(torch.get_num_threads()))
    code, payload, output = certify(MLP, "--data", data, *LOCAL, "--ray", "--workers", "2",
                                    "--json", tmp_path / "r.json")
    assert code == 0, output
    same_report(serial, payload)
    assert any("Ray tasks (2 CPUs" in n for n in payload["notes"])


def test_ray_address_that_answers_nothing_is_exit_2(data):
    pytest.importorskip("ray")
    code, _, output = certify(MLP, "--data", data, *LOCAL, "--ray", "127.0.0.1:1")
    assert code == 2 and "--ray 127.0.0.1:1" in output


def test_ray_missing_is_exit_2(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails, as without the extra
    code, _, output = certify(MLP, "--data", data, *LOCAL, "--ray")
    assert code == 2 and "pip install 'lipcert[ray]'" in output


@pytest.mark.parametrize("bad", ["NaN", "-1.0", '"x"'])
def test_a_checkpoint_with_bad_bounds_gives_no_radius(data, tmp_path, bad):
    ckpt = tmp_path / "run.jsonl"
    assert certify(MLP, "--data", data, *LOCAL, "--checkpoint", ckpt)[0] == 0
    lines = ckpt.read_text().splitlines()
    entry = json.loads(lines[1])
    lines[1] = json.dumps(entry).replace(json.dumps(entry["bounds"][0]), bad, 1)
    ckpt.write_text("\n".join(lines) + "\n")
    code, _, output = certify(MLP, "--data", data, *LOCAL, "--checkpoint", ckpt, "--resume")
    assert code == 2 and "numbers" in output
