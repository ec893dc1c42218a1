"""Benchmark: LipSDP bounds and wall time (build, solve, check separately).

Sections (every bound is a checked certificate; "none" means no certificate was found):
  1. random ReLU MLPs 8-w^d-4 of growing width and depth: every form (neuron, layer,
     eclipse-fast) and every multiplier proposer (clarabel, scs, firstorder, auto);
  2. end to end at ~60 hidden neurons: the Python API call and the ``lipcert bound`` CLI;
  3. the bundled digits models: MLP (l2, linf), MaxMin (GroupSort constraints, l2, linf),
     CNN (convolutions unrolled into matrices), with naive and sampled lower bounds;
  4. the random networks of the ECLipsE paper (their generator: numpy seed
     7 width + 13 layers, input 4, output 1, each layer scaled to a spectral norm drawn in
     [0.4, 1.8]), against ECLipsE-Fast's closed form as the reference code computes it;
  5. the largest network each form bounds within 60 s (2 hidden layers of growing width);
  6. the scale targets, each in a fresh process (peak memory is that process's): the
     LipSDP authors' own example weights (2-10-30-20-2 and MNIST 784-50-10, read from a
     fetched copy of github.com/arobey1/LipSDP: set LIPSDP_REPO, skipped when absent)
     under every proposer; a 784-1024x4-10 ReLU MLP (ECLipsE-Fast against Neuron);
     a MaxMin 784-64x7-10 net; the OVAL21 CIFAR convnets cifar_base_kw (../shared/onnx)
     and cifar_wide_kw (a fetched vnncomp2021 snapshot, see :func:`oval21_net`), their
     convolutions unrolled, with a time limit of 450 s each (gram: 20.5 and 16.9).

    python bench/lipsdp.py [--sections 1,2,3,4,5,6] [--time-limit 60] [--targets a,b]
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RELU = (0.0, 1.0)


def random_mlp(n_in: int, widths: list[int], n_out: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [n_in, *widths, n_out]
    return [rng.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(sizes, sizes[1:],
                                                                       strict=False)]


def naive_l2(weights) -> float:
    return float(np.prod([np.linalg.norm(w, 2) for w in weights]))


def fmt(value) -> str:
    return f"{value:11.5g}" if value is not None else f"{'none':>11}"


def run_one(weights, slopes, form, solver, time_limit, norm="2"):
    from lipcert.estimators.lipsdp.subchains import bound_subchain

    t0 = time.perf_counter()
    value, info = bound_subchain(weights, slopes, form, solver, time_limit, norm)
    return value, info, time.perf_counter() - t0


def row(name, neurons, form, solver, value, info, wall, naive, extra=""):
    print(f"{name:24} {neurons:7d} {form:12} {solver:10} {fmt(value)} {naive:11.5g} "
          f"{info.get('build_s', 0):6.2f} {info.get('solve_s', 0):7.2f} "
          f"{info.get('check_s', 0):6.2f} {wall:7.2f}  {extra}", flush=True)


HEADER = (f"{'network':24} {'neurons':>7} {'form':12} {'proposer':10} {'bound':>11} "
          f"{'naive':>11} {'build':>6} {'solve':>7} {'check':>6} {'total':>7}")


def section_random(time_limit: float) -> None:
    print("\n## 1. random ReLU MLPs (l2), seconds\n")
    print(HEADER)
    for width in (8, 16, 32, 64):
        for depth in (1, 2, 4):
            weights = random_mlp(8, [width] * depth, 4)
            slopes = [RELU] * depth
            neurons = width * depth
            size = 8 + neurons
            for form in ("neuron", "layer", "eclipse-fast"):
                solvers = ["auto"] if form == "eclipse-fast" else \
                    ["auto", "barrier", "clarabel", "scs", "firstorder"]
                for solver in solvers:
                    if solver == "clarabel" and size > 100:
                        print(f"{'8-' + '-'.join([str(width)] * depth) + '-4':24} {neurons:7d} "
                              f"{form:12} {solver:10} skipped: LMI size {size} (cost ~ d^6)")
                        continue
                    value, info, wall = run_one(weights, slopes, form, solver, time_limit)
                    row("8-" + "-".join([str(width)] * depth) + "-4", neurons, form, solver,
                        value, info, wall, naive_l2(weights), " ".join(info["proposers"]))


def _export_mlp(weights, path: Path) -> Path:
    import torch
    from torch import nn

    layers = []
    for k, w in enumerate(weights):
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(w))
            lin.bias.zero_()
        layers += [lin, nn.ReLU()] if k < len(weights) - 1 else [lin]
    model = nn.Sequential(*layers).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, weights[0].shape[1]),), str(path),
                          dynamo=False, input_names=["x"], output_names=["y"])
    return path


def section_end_to_end() -> None:
    import lipcert

    print("\n## 2. end to end at ~60 hidden neurons (solver auto), seconds\n")
    print(f"{'network':16} {'API bound':>10} {'API s':>7} {'CLI s':>7}  proposers")
    with tempfile.TemporaryDirectory() as tmp:
        for widths in ([60], [30, 30], [20, 20, 20]):
            weights = random_mlp(8, widths, 4, seed=1)
            path = _export_mlp(weights, Path(tmp) / "m.onnx")
            graph = lipcert.load(path)
            t0 = time.perf_counter()
            result = lipcert.bound(graph, "lipsdp", "2")
            api = time.perf_counter() - t0
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", "from lipcert.cli import main; main()",
                            "bound", str(path), "-m", "lipsdp", "--json",
                            str(Path(tmp) / "out.json")], check=True, capture_output=True)
            cli = time.perf_counter() - t0
            name = "8-" + "-".join(map(str, widths)) + "-4"
            proposers = " ".join(result.details.get("proposers", []))
            print(f"{name:16} {result.upper:10.5g} {api:7.2f} {cli:7.2f}  {proposers}", flush=True)


def section_digits(time_limit: float) -> None:
    import lipcert
    from lipcert.estimators.lower import sample_lower_bound

    print("\n## 3. bundled digits models (lipcert.bound, solver auto), seconds\n")
    print(f"{'model':14} {'norm':4} {'options':22} {'bound':>11} {'naive':>11} {'lower':>9} "
          f"{'time':>7}  proposers / status")
    runs = [("digits_mlp", "2", {}), ("digits_mlp", "2", {"form": "layer"}),
            ("digits_mlp", "2", {"form": "eclipse-fast"}), ("digits_mlp", "inf", {}),
            ("digits_maxmin", "2", {}), ("digits_maxmin", "2", {"form": "layer"}),
            ("digits_maxmin", "inf", {}), ("digits_cnn", "2", {"split": 1}),
            ("digits_cnn", "2", {}), ("digits_cnn", "2", {"form": "eclipse-fast"})]
    for model, norm, options in runs:
        graph = lipcert.load(ROOT / "models" / f"{model}.onnx")
        naive = lipcert.bound(graph, "naive", norm).upper
        lower = sample_lower_bound(graph, norm)[0]
        t0 = time.perf_counter()
        result = lipcert.bound(graph, "lipsdp", norm, time_limit=time_limit, **options)
        wall = time.perf_counter() - t0
        text = " ".join(f"{k}={v}" for k, v in options.items()) or "-"
        status = " ".join(sorted({p for sc in result.details.get("subchains", [])
                                  for p in sc["proposers"]})) if result.upper else \
            result.notes[-1][:60]
        print(f"{model:14} {norm:4} {text:22} {fmt(result.upper)} {naive:11.5g} "
              f"{lower:9.5g} {wall:7.2f}  {status}", flush=True)


def eclipse_paper_network(layers: int, width: int) -> list[np.ndarray]:
    """The ECLipsE paper's random network (their generate_random_weights.py, re-written)."""
    rng = np.random.RandomState(width * 7 + layers * 13)
    dims = [4] + [width] * (layers - 1) + [1]
    weights = []
    for a, b in zip(dims, dims[1:], strict=False):
        target = rng.uniform(0.4, 1.8)
        w = rng.randn(b, a)
        weights.append(target * w / np.linalg.norm(w, 2))
    return weights


def eclipse_fast_reference(weights) -> float:
    """ECLipsE-Fast as the reference code computes it (ReLU, alpha = 0, beta = 1): X_0 = I,
    l_i = 1 / (2 m^2 lambda_max(W_i X^-1 W_i^T)), X_i = l_i I - l_i^2 m^2 W_i X^-1 W_i^T,
    L^2 = lambda_max(W_l^T W_l X_{l-1}^-1); plain floating point, unchecked."""
    m = 0.5
    x = np.eye(weights[0].shape[1])
    for w in weights[:-1]:
        k = w @ np.linalg.solve(x, w.T)
        li = 1.0 / (2 * m * m * np.linalg.eigvalsh((k + k.T) / 2)[-1])
        x = li * np.eye(w.shape[0]) - li * li * m * m * k
    wl = weights[-1]
    return float(math.sqrt(max(np.linalg.eigvals(wl.T @ wl @ np.linalg.inv(x)).real)))


def section_eclipse_paper(time_limit: float) -> None:
    print("\n## 4. ECLipsE paper networks (input 4, output 1, ReLU), seconds\n")
    print("(Neuron on the whole chain up to 600 hidden neurons; split=5: Neuron on sub-chains "
          "of 5 hidden layers)\n")
    print(f"{'layers x width':16} {'trivial':>10} {'ref Fast':>10} {'our Fast':>10} "
          f"{'t Fast':>7} {'Neuron':>10} {'t Neuron':>8} {'split=5':>10} {'t split':>8}")
    for layers, width in ((2, 20), (5, 20), (10, 20), (20, 20), (5, 60), (10, 60), (20, 60),
                          (30, 60), (50, 20)):
        weights = eclipse_paper_network(layers, width)
        slopes = [RELU] * (layers - 1)
        ref = eclipse_fast_reference(weights)
        fast, _, t_fast = run_one(weights, slopes, "eclipse-fast", "auto", time_limit)
        if width * (layers - 1) <= 600:
            neuron, _, t_neuron = run_one(weights, slopes, "neuron", "auto", time_limit)
        else:
            neuron, t_neuron = None, 0.0
        import lipcert.estimators.lipsdp.subchains as lipsdp

        t0 = time.perf_counter()
        total = 1.0
        for part, part_slopes in lipsdp.split_chain(weights, slopes, 5):
            value, _ = lipsdp.bound_subchain(part, part_slopes, "neuron", "auto", time_limit)
            total = math.inf if value is None else total * value
        t_split = time.perf_counter() - t0
        shown = fmt(neuron)[1:] if width * (layers - 1) <= 600 else f"{'skipped':>10}"
        print(f"{f'{layers} x {width}':16} {naive_l2(weights):10.5g} {ref:10.5g} {fmt(fast)[1:]} "
              f"{t_fast:7.2f} {shown} {t_neuron:8.2f} {total:10.5g} {t_split:8.2f}",
              flush=True)


def section_largest(time_limit: float) -> None:
    print(f"\n## 5. largest 2-hidden-layer net 64-w-w-10 bounded within {time_limit:g} s\n")
    print(f"{'form':14} {'width':>6} {'neurons':>8} {'bound':>11} {'naive':>11} {'total s':>8}")
    plans = {"neuron": (64, 128, 256, 384, 512), "layer": (64, 128, 256, 384, 512),
             "eclipse-fast": (256, 512, 1024, 2048)}
    for form, widths in plans.items():
        for width in widths:
            weights = random_mlp(64, [width, width], 10, seed=2)
            value, info, wall = run_one(weights, [RELU] * 2, form, "auto", time_limit)
            ok = value is not None and wall <= time_limit * 1.1
            print(f"{form:14} {width:6d} {2 * width:8d} {fmt(value)} {naive_l2(weights):11.5g} "
                  f"{wall:8.2f}  {' '.join(info['proposers'])}", flush=True)
            if not ok:
                break


CIFAR_TIME_LIMIT = 450.0  # the final certificate adds ~20 s to cifar_wide_kw's 450
LIPSDP_REPO = Path(os.environ.get("LIPSDP_REPO", "/work/.mirror/arobey1+LipSDP/repo"))


def lipsdp_example(name: str) -> list[np.ndarray] | None:
    """The LipSDP authors' saved weights (examples/saved_weights/<name>_weights.mat), read
    from a fetched git copy of their repository; None when it is absent."""
    import io

    import scipy.io

    path = f"HEAD:LipSDP/examples/saved_weights/{name}_weights.mat"
    try:
        raw = subprocess.run(["git", "--git-dir", str(LIPSDP_REPO), "show", path],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [np.asarray(w, dtype=np.float64) for w in scipy.io.loadmat(io.BytesIO(raw))
            ["weights"][0]]


def _maxmin_groups(width: int):
    from lipcert.estimators.lipsdp.lmi import GroupQC

    h = width // 2
    return GroupQC(np.array([[i, i + h] for i in range(h)]))


def target_case(name: str):
    """(weights, slopes) of a scale target, or None when its data is absent."""
    if name in ("random", "mnist"):
        weights = lipsdp_example(name)
        return None if weights is None else (weights, [RELU] * (len(weights) - 1))
    if name == "mlp4096":
        return random_mlp(784, [1024] * 4, 10, seed=3), [RELU] * 4
    if name == "maxmin448":
        return random_mlp(784, [64] * 7, 10, seed=4), [_maxmin_groups(64)] * 7
    if name in ("cifar_base_kw", "cifar_wide_kw"):  # OVAL21 CIFAR convnets, convs unrolled
        path = oval21_net(name)
        if path is None:
            return None
        import lipcert
        from lipcert.estimators.lipsdp.estimator import (
            MAX_ENTRIES,
            SLOPE_RESTRICTED,
            dense_chain,
            slopes_of,
        )
        from lipcert.ir import ops

        chain = dense_chain(lipcert.load(path), "lipsdp", (*SLOPE_RESTRICTED, ops.GroupSort),
                            MAX_ENTRIES)
        return chain.weights, slopes_of(chain)
    raise ValueError(name)


VNNCOMP2021 = Path(os.environ.get("VNNCOMP2021", ROOT.parent / ".mirror" /
                                  "stanleybak+vnncomp2021" / "repo"))


def oval21_net(name: str) -> Path | None:
    """An OVAL21 network: ../shared/onnx/<name>.onnx, else benchmarks/oval21/nets/ of a
    fetched snapshot of github.com/stanleybak/vnncomp2021 (a bare git directory at
    $VNNCOMP2021 or ../.mirror/stanleybak+vnncomp2021/repo), copied to a temporary file;
    None when neither is there."""
    shared = ROOT.parent / "shared" / "onnx" / f"{name}.onnx"
    if shared.exists():
        return shared
    try:
        raw = subprocess.run(["git", "--git-dir", str(VNNCOMP2021), "show",
                              f"HEAD:benchmarks/oval21/nets/{name}.onnx"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = Path(tempfile.gettempdir()) / f"lipcert_bench_{name}.onnx"
    path.write_bytes(raw)
    return path


def run_case(spec: str, time_limit: float) -> None:
    """Child process: one target under one (form, proposer); prints one JSON line."""
    import json
    import resource

    name, form, solver = spec.split(":")
    weights, slopes = target_case(name)
    value, info, wall = run_one(weights, slopes, form, solver, time_limit)
    print(json.dumps({"bound": value, "solve_s": info.get("solve_s", 0.0),
                      "check_s": info.get("check_s", 0.0), "wall_s": wall,
                      "status": "; ".join(info.get("solver_status", {}).values()),
                      "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def section_targets(time_limit: float, only: set[str] | None = None) -> None:
    import json

    print(f"\n## 6. scale targets (l2), each in a fresh process, time limit {time_limit:g} s\n")
    print(f"{'network':24} {'neurons':>7} {'form':12} {'proposer':9} {'bound':>11} "
          f"{'naive':>9} {'solve':>7} {'check':>6} {'total':>7} {'peak MB':>8}  status")
    plans = [("random", [("neuron", p) for p in ("barrier", "clarabel", "scs", "firstorder")]),
             ("mnist", [("neuron", p) for p in ("barrier", "scs", "firstorder")]),
             ("maxmin448", [("neuron", "auto")]),
             ("mlp4096", [("eclipse-fast", "auto"), ("neuron", "auto")]),
             ("cifar_base_kw", [("neuron", "auto")]),
             ("cifar_wide_kw", [("neuron", "auto")])]
    # the CIFAR convnets get the time that keeps a bound under 10 minutes in all
    limits = {"cifar_base_kw": CIFAR_TIME_LIMIT, "cifar_wide_kw": CIFAR_TIME_LIMIT}
    for name, runs in plans:
        if only and name not in only:
            continue
        case = target_case(name)
        if case is None:
            print(f"{name:24} skipped: its data is absent (LipSDP repository at "
                  f"{LIPSDP_REPO}, ../shared/onnx, or a vnncomp2021 snapshot at {VNNCOMP2021})")
            continue
        weights, _ = case
        label = {"random": "LipSDP 2-10-30-20-2", "mnist": "LipSDP mnist 784-50-10",
                 "maxmin448": "MaxMin 784-64x7-10", "mlp4096": "ReLU 784-1024x4-10",
                 "cifar_base_kw": "cifar_base_kw (unrolled)",
                 "cifar_wide_kw": "cifar_wide_kw (unrolled)"}[name]
        neurons = sum(w.shape[0] for w in weights[:-1])
        for form, solver in runs:
            out = subprocess.run([sys.executable, __file__, "--case", f"{name}:{form}:{solver}",
                                  "--time-limit", str(limits.get(name, time_limit))],
                                 capture_output=True, text=True)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                print(f"{label:24} {form} {solver}: failed: {out.stderr[-300:]}")
                continue
            r = json.loads(lines[-1])
            print(f"{label:24} {neurons:7d} {form:12} {solver:9} {fmt(r['bound'])} "
                  f"{naive_l2(weights):9.4g} {r['solve_s']:7.2f} {r['check_s']:6.2f} "
                  f"{r['wall_s']:7.2f} {r['peak_mb']:8.0f}  {r['status'][:70]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="1,2,3,4,5,6")
    parser.add_argument("--time-limit", type=float, default=60.0)
    parser.add_argument("--targets", help="section 6 only for these (comma-separated: random, "
                        "mnist, maxmin448, mlp4096, cifar_base_kw, cifar_wide_kw)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.case:
        sys.path.insert(0, str(ROOT))
        return run_case(args.case, args.time_limit)
    chosen = set(args.sections.split(","))
    print(f"# bench/lipsdp.py (time limit {args.time_limit:g} s per bound)")
    for key, fn in (("1", lambda: section_random(args.time_limit)),
                    ("2", section_end_to_end),
                    ("3", lambda: section_digits(args.time_limit)),
                    ("4", lambda: section_eclipse_paper(args.time_limit)),
                    ("5", lambda: section_largest(args.time_limit)),
                    ("6", lambda: section_targets(max(args.time_limit, 280.0), set(
                        args.targets.split(",")) if args.targets else None))):
        if key in chosen:
            fn()


if __name__ == "__main__":
    main()
