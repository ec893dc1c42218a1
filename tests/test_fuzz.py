"""Fuzz suite: malformed models, data files, options and configs through the CLI entry point
in-process. Every case ends in exit 0 with a bound at least onnxruntime's sampled secant
quotient (or certified samples that random attacks inside their radius do not flip), exit 1
only for a failed gate, or exit 2 with one line and no traceback, within a hang limit.

CI runs a few hundred cases with a fixed seed (derandomised, so CI is repeatable); a release
run draws fresh ones: ``LIPCERT_FUZZ_EXAMPLES=1000 LIPCERT_FUZZ_RANDOM=1 python -m pytest
tests/test_fuzz.py`` (the number is a percentage of the CI counts).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from functools import cache
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import onnx
import pytest
from fuzzing import (
    MUTATIONS,
    REAL,
    SEEDS,
    SPECIAL,
    assert_bound_sound,
    assert_contract,
    examples,
    hang_limit,
    mutate_bytes,
    run_cli,
    seed_model,
)
from helpers import MODELS
from hypothesis import HealthCheck, given, settings

pytestmark = pytest.mark.filterwarnings("ignore")

FUZZ = dict(deadline=None, derandomize=not os.environ.get("LIPCERT_FUZZ_RANDOM"),
            suppress_health_check=list(HealthCheck), database=None)
TMP = Path(tempfile.mkdtemp(prefix="lipcert-fuzz-"))
atexit.register(shutil.rmtree, TMP, True)
COMMANDS = [("naive", "2"), ("naive", "inf"), ("gram", "2"), ("lipsdp", "2"), ("local", "inf"),
            ("inspect", None)]


@cache
def tiny_model() -> Path:
    path = TMP / "tiny.onnx"
    onnx.save(seed_model("mlp", seed=3), path)
    return path


def _case_path(suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix, dir=TMP)
    os.close(fd)
    return Path(name)


@settings(max_examples=examples(300), **FUZZ)
@given(st.data())
def test_fuzz_models(data):
    """Structure, attributes, dtypes, special values, opsets and bytes of real and generated
    models: exit 0 with a sound bound, or exit 2 with one line."""
    draw = data.draw
    name = draw(st.sampled_from([*SEEDS, *SEEDS, *REAL]), label="seed")
    model = seed_model(name, seed=draw(st.integers(0, 3), label="weights"))
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), min_size=0, max_size=3),
                         label="mutations"):
        mutation(model, draw)
    path = _case_path(".onnx")
    path.write_bytes(mutate_bytes(model.SerializeToString(), draw))
    commands = COMMANDS if name in SEEDS else [c for c in COMMANDS if c[0] != "lipsdp"]
    method, norm = draw(st.sampled_from(commands), label="command")
    try:
        if method == "inspect":
            assert_contract(run_cli(["inspect", path]))
            return
        extra = ["-o", "bab_time=0"] if method == "local" and name not in SEEDS else []
        out = run_cli(["bound", path, "-m", method, "-n", norm, "--json", "-", *extra])
        assert_contract(out)
        if out.exit_code == 0:
            assert_bound_sound(out, path, norm, box=(-1.0, 1.0) if method == "local" else None)
    finally:
        path.unlink()


# -- data files ---------------------------------------------------------------------------
def _draw_array(draw, n: int, per_sample: int, what: str):
    kind = draw(st.sampled_from(["good", "good", "shape", "scalar", "dtype", "special",
                                 "empty", "length"]), label=f"{what} kind")
    rng = np.random.default_rng(draw(st.integers(0, 9), label=f"{what} seed"))
    if what == "x":
        good = rng.uniform(-1, 1, (n, 1, per_sample)).astype(np.float32)
    else:
        good = rng.integers(0, 3, n)
    if kind == "good":
        return good
    if kind == "shape":
        return np.resize(good, draw(st.lists(st.integers(0, 6), max_size=3), label="dims"))
    if kind == "scalar":
        return np.asarray(good.reshape(-1)[0])
    if kind == "dtype":
        target = draw(st.sampled_from([np.complex64, np.bool_, np.str_, np.float16, np.int8,
                                       np.uint64, np.float64]), label="dtype")
        return good.astype(target)
    if kind == "special":
        out = good.astype(np.float64).copy()
        out.reshape(-1)[draw(st.integers(0, out.size - 1))] = draw(st.sampled_from(SPECIAL))
        return out if what == "x" or draw(st.booleans()) else out + 0.5
    if kind == "empty":
        return good[:0]
    return good[: max(0, n - draw(st.integers(1, 3), label="short"))]


@settings(max_examples=examples(100), **FUZZ)
@given(st.data())
def test_fuzz_data(data):
    """certify on bad x / y arrays and files: exit 0 (certified samples survive random
    attacks), 1 for a failed gate, or 2 with one line."""
    draw = data.draw
    n = draw(st.integers(1, 12), label="n")
    x, y = _draw_array(draw, n, 4, "x"), _draw_array(draw, n, 4, "y")
    layout = draw(st.sampled_from(["npz", "npz", "npy", "garbage", "missing_y"]), label="file")
    path = _case_path(".npz" if layout != "npy" else ".npy")
    labels = None
    if layout == "npz":
        np.savez(path, x=x, y=y)
    elif layout == "missing_y":
        np.savez(path, x=x)
    elif layout == "npy":
        np.save(path, x)
        labels = _case_path(".npy")
        np.save(labels, y)
    else:
        path.write_bytes(draw(st.binary(max_size=256), label="garbage"))
    eps = draw(st.sampled_from(["0", "0.01", "0.1", "1"]), label="eps")
    norm = draw(st.sampled_from(["2", "inf"]), label="norm")
    args = ["certify", tiny_model(), "--data", path, "--eps", eps, "--norm", norm, "--json", "-"]
    if labels is not None:
        args += ["--labels", labels]
    if draw(st.booleans(), label="gate"):
        args += ["--min-certified-accuracy", "0.5"]
    try:
        out = run_cli(args)
        assert_contract(out, allow_gate=True)
        if out.exit_code in (0, 1):
            assert_certified_survive(out, tiny_model(), np.load(path) if layout == "npy"
                                     else np.load(path)["x"], norm)
    finally:
        path.unlink()
        if labels is not None:
            labels.unlink()


def assert_certified_survive(out, model_path: Path, x: np.ndarray, norm: str,
                             tries: int = 16) -> None:
    """Every certified sample keeps its prediction at random points inside its radius
    (onnxruntime), and no radius is NaN."""
    import onnxruntime as ort

    payload = out.json()
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    for sample in payload["samples"]:
        if not sample["certified"]:
            continue
        r = sample["radius"]
        assert isinstance(r, float) and r > 0, out.describe()
        x0 = x[sample["index"]]
        for _ in range(tries):
            d = rng.standard_normal(x0.size)
            d *= 0.999 * min(r, 1e6) / np.linalg.norm(d, 2 if norm == "2" else np.inf)
            logits = session.run(None, {"x": (x0 + d).astype(np.float32).reshape(1, -1)})[0]
            assert int(np.argmax(logits)) == sample["label"], out.describe()


# -- options ------------------------------------------------------------------------------
NUMBERS = ["nan", "inf", "-inf", "-1", "0", "1e-300", "0.05", "1", "1e308", "abc", "", "0x10"]
DOMAINS = ["0,1", "-1,1", "1,0", "0,inf", "nan,1", "0", "a,b", "0,1,2", "-1e308,1e308"]
OPTION_VALUES = ["iterations=3", "iterations=-1", "iterations=abc", "nope=1", "bab_time=0",
                 "bab_time=nan", "time_limit=inf", "domain=0,1", "batch=0", "form=layer",
                 "form=bogus", "solver=scs", "split=1", "=", "x", "max_entries=1e999"]


@settings(max_examples=examples(90), **FUZZ)
@given(st.data())
def test_fuzz_options(data):
    """Every command with bad and good option values: exit 0/1/2 by the contract, and a
    local bound that exits 0 is at least onnxruntime's secant quotient on its box."""
    draw = data.draw
    command = draw(st.sampled_from(["bound", "bound", "certify", "compare"]), label="command")
    model = tiny_model()
    point = TMP / "point.npy"
    np.save(point, np.linspace(-0.5, 0.5, 4).astype(np.float32).reshape(1, 4))
    batch = TMP / "batch.npz"
    np.savez(batch, x=np.linspace(0, 1, 20).astype(np.float32).reshape(5, 1, 4),
             y=np.array([0, 1, 2, 0, 1]))
    args: list = [command, model]
    opts = draw(st.fixed_dictionaries({}, optional={
        "--method": st.sampled_from(["naive", "gram", "local", "lipsdp", "exact", "lower",
                                     "nope"]),
        "--norm": st.sampled_from(["2", "inf", "1", "l2", "x"]),
        "--eps": st.sampled_from(NUMBERS),
        "--domain": st.sampled_from(DOMAINS),
        "--device": st.sampled_from(["cpu", "meta", "cuda", "cuda:x", "", "CPU"]),
        "--index": st.sampled_from(["0", "4", "5", "-1", "-6", "x"]),
        "-o": st.sampled_from(OPTION_VALUES),
    }), label="options")
    if command == "certify":
        args += ["--data", batch, "--eps", opts.pop("--eps", "0.01")]
        opts.pop("--domain", None)
        opts.pop("--index", None)
        if draw(st.booleans(), label="report"):
            args += ["--report-eps", draw(st.sampled_from(["nan,inf,-1", "0.1,0.2", "x", ""]))]
    elif command == "compare":
        opts["--methods"] = draw(st.sampled_from(["naive", "naive,gram", "naive,nope", ",",
                                                  ""]), label="methods")
        opts.pop("--method", None)
        opts.pop("-o", None)
        args += ["--timeout", draw(st.sampled_from(["-1", "0", "nan", "60"]), label="t")]
    if command != "certify" and draw(st.booleans(), label="input"):
        args += ["--input", draw(st.sampled_from([point, batch, TMP / "absent.npy"]))]
    for key, value in opts.items():
        args += [key, value]
    out = run_cli([*args, "--json", "-"])
    assert_contract(out, allow_gate=command == "certify")
    if out.exit_code == 0 and command == "bound":
        box = _box_of(opts, args, point, batch)
        assert_bound_sound(out, model, _norm_of(opts), box=box)


def _norm_of(opts) -> str:
    return "inf" if opts.get("--norm") == "inf" else "2"


def _box_of(opts, args, point, batch):
    """The region a box-scoped bound that exited 0 holds on, computed independently."""
    if opts.get("--method") not in ("local", "exact", "lower"):
        return None
    domain = opts.get("--domain")
    lo_d, hi_d = (float(v) for v in domain.split(",")) if domain else (-1.0, 1.0)
    if "--input" not in args:
        return lo_d, hi_d
    source = args[args.index("--input") + 1]
    x = np.load(source).reshape(-1) if source == point else \
        np.load(source)["x"][int(opts.get("--index", 0))].reshape(-1)
    eps = float(opts["--eps"])
    if domain is None:
        return x - eps, x + eps
    return np.maximum(x - eps, lo_d), np.minimum(x + eps, hi_d)


# -- configs ------------------------------------------------------------------------------
TOML_VALUES = ['5', '0.1', '"naive"', '"naive,gram"', '["naive", "gram"]', '[0.05, 0.1]', 'true',
               '{ iterations = 3 }', '"abc"', 'nan', 'inf', '-1', '[]', '{}', '"2"',
               f'"{MODELS / "digits_mlp.onnx"}"']
TOML_KEYS = {"certify": ["model", "data", "labels", "eps", "norm", "method", "device",
                         "min_certified_accuracy", "report_eps", "options", "bogus"],
             "compare": ["methods", "norm", "timeout", "bogus"],
             "methods.naive": ["iterations", "bogus"], "methods.gram": ["iterations"],
             "methods.nope": ["x"], "other": ["x"]}


@settings(max_examples=examples(100), **FUZZ)
@given(st.data())
def test_fuzz_configs(data):
    """TOML configs with wrong types, unknown keys and sections, and non-TOML bytes."""
    draw = data.draw
    lines, chosen = [], set()
    for section in draw(st.lists(st.sampled_from(sorted(TOML_KEYS)), max_size=3,
                                 unique=True), label="sections"):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(TOML_KEYS[section]), max_size=4, unique=True)):
            lines.append(f"{key} = {draw(st.sampled_from(TOML_VALUES), label=key)}")
            chosen.add(f"{section}.{key}")
    text = "\n".join(lines).encode()
    if draw(st.integers(0, 9), label="raw") == 0:
        text = draw(st.binary(max_size=200), label="bytes")
    path = _case_path(".toml")
    path.write_bytes(text)
    command = draw(st.sampled_from(["certify", "certify", "compare"]), label="command")
    if command == "certify":
        batch = TMP / "cfg-batch.npz"
        np.savez(batch, x=np.linspace(0, 1, 8).astype(np.float32).reshape(2, 4),
                 y=np.array([0, 1]))
        args = [command, "--config", path, tiny_model(), "--data", batch, "--eps", "0.01"]
    else:  # configs are checked before the model is read: a model refused at once keeps
        # the case cheap (each compare method is a process of its own); one valid compare
        # config runs for real in test_bad_input.py
        empty = TMP / "refused.onnx"
        empty.write_bytes(b"")
        args = [command, "--config", path, empty, "--timeout", "60"]
    try:
        assert_contract(run_cli([*args, "--json", "-"]), allow_gate=True)
    finally:
        path.unlink()


# -- files --------------------------------------------------------------------------------
def _special_files(tmp: Path) -> dict[str, Path]:
    fifo = tmp / "pipe.onnx"
    os.mkfifo(fifo)
    (tmp / "empty.onnx").write_bytes(b"")
    (tmp / "folder.onnx").mkdir()
    big = tmp / "big.onnx"
    with open(big, "wb") as f:  # sparse: 3 GiB of nothing, above the 2 GiB cap
        f.truncate(3 * 1024**3)
    return {"fifo": fifo, "dev_zero": Path("/dev/zero"), "directory": tmp / "folder.onnx",
            "proc_mem": Path("/proc/self/mem"), "empty": tmp / "empty.onnx", "big": big,
            "long_name": tmp / ("x" * 300 + ".onnx"), "absent": tmp / "absent.onnx"}


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory", "proc_mem", "empty", "big",
                                  "long_name", "absent"])
def test_special_model_files_refused_at_once(tmp_path, kind):
    path = _special_files(tmp_path)[kind]
    with hang_limit(30):
        out = run_cli(["bound", path])
    assert out.exit_code == 2, out.describe()
    assert_contract(out)


def test_model_size_cap_is_a_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPCERT_MAX_MODEL_BYTES", "100")
    out = run_cli(["bound", MODELS / "digits_mlp.onnx"])
    assert out.exit_code == 2 and "LIPCERT_MAX_MODEL_BYTES" in out.stderr, out.describe()
