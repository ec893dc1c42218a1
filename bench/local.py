"""Benchmark: local linf Lipschitz bounds (Clarke-Jacobian bound propagation + BaB).

Models: a 784-100-100-10 ReLU MLP trained here on scikit-learn's digits upsampled to 28x28
(real data, no download; inputs in [0, 1]), and the bundled models/digits_cnn.onnx. For a
test sample and several eps (box x0 +- eps within [0, 1]) it reports: the bound without
branching, the BaB bound after 10 s and after 30 s (two runs), the sampled lower bound in the box
(``lower``), the exact local value when BaB closed the gap, and the global naive linf bound.

``--scale``: the root bound (no branching) on CIFAR-size convnets, each in a fresh process
so its peak memory (max RSS) is its own: ../shared/onnx's cifar_base_kw and resnet_2b
(skipped when ../shared is absent) and a convnet of the wide Wong-Kolter architecture
(cifar_wide_kw: conv 3->16 and 16->32, 4x4 stride 2, then 2048-100-10) trained here for a
few epochs on digits upsampled to 3x32x32 (real data, no download), at a fixed point in
[0.2, 0.8]^3072 and eps 0.002 clipped to [0, 1].

``--baseline``: lipcert's root bound with plain CROWN (``optimize_steps=0``) and with its
default alpha-CROWN slopes, side by side with an alpha-CROWN-style baseline re-implemented
in bench/alpha_crown_baseline.py (auto_LiRPA's default Jacobian-bound pipeline), on the
bundled digits models, the VNN-COMP 2021 mnistfc MLPs 784-256x2/x4/x6-10 at their first
instance (read from a snapshot of stanleybak/vnncomp2021 as in bench/certify_bab.py,
skipped when absent) and cifar_base_kw (../shared, skipped when absent). lipcert's values
are its exact-arithmetic bounds (before the float32 execution margin), the quantity the
baseline computes.

    python bench/local.py [--eps 0.005,0.01,0.02,0.05] [--budget 30]
    python bench/local.py --scale [--device cuda]
    python bench/local.py --baseline
    python bench/local.py --case

``--case``: the box of ../shared/cases/mnist256x2_x0.npy (mnist-net_256x2, eps 0.03 in
[0, 1]; exact local constant 19.0962) with 60 s of branch-and-bound, with the split
multipliers (default) and without (``optimize_steps=0``): the bound after 10, 30 and 60 s
(three runs each; root before the float32 margin, the others after it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lipcert
from lipcert.errors import LipcertError

ROOT = Path(__file__).resolve().parents[1]
SHARED_ONNX = ROOT.parent / "shared" / "onnx"


def digits28() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images / 16.0, dtype=torch.float32)[:, None]
    x = torch.nn.functional.interpolate(x, size=(28, 28), mode="bilinear",
                                        align_corners=False).clamp(0, 1)
    return x.reshape(len(x), -1).numpy(), data.target


def train_mlp(path: Path) -> np.ndarray:
    x, y = digits28()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                        nn.Linear(100, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    xt, yt = torch.as_tensor(x[:1500]), torch.as_tensor(y[:1500])
    for _ in range(60):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = (net(torch.as_tensor(x[1500:])).argmax(1).numpy() == y[1500:]).mean()
    print(f"784-100-100-10 MLP on upsampled digits: test accuracy {acc:.3f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (xt[:1],), str(path), dynamo=False, opset_version=17)
    return x[1500]


def bench(name: str, graph, x0: np.ndarray, eps_list: list[float], budget: float) -> None:
    naive = lipcert.bound(graph, "naive", "inf").upper
    print(f"\n{name}: naive linf (global) {naive:.4g}")
    print(f"{'eps':>7} {'unstable':>8} {'no BaB':>10} {'BaB 10s':>10} {f'BaB {budget:g}s':>10} "
          f"{'domains':>8} {'lower':>10} {'exact?':>6} {'lower est':>10}")
    for eps in eps_list:
        region = {"center": x0, "eps": eps, "domain": (0.0, 1.0)}
        root = lipcert.bound(graph, "local", "inf", bab_time=0, **region)
        b10 = lipcert.bound(graph, "local", "inf", bab_time=min(10.0, budget),
                            **region).upper
        t0 = time.perf_counter()
        bab = lipcert.bound(graph, "local", "inf", bab_time=budget, **region)
        elapsed = time.perf_counter() - t0
        lower = lipcert.bound(graph, "lower", "inf", **region).lower
        print(f"{eps:>7g} {root.details['unstable_at_root']:>8} {root.upper:>10.4f} "
              f"{b10:>10.4f} {bab.upper:>10.4f} {bab.details['domains']:>8} "
              f"{bab.lower or 0:>10.4f} {'yes' if bab.details['exact'] else 'no':>6} "
              f"{lower:>10.4f}   ({bab.details['stopped']}, {elapsed:.1f} s)")


def train_wide_cnn(path: Path) -> None:
    """The cifar_wide_kw architecture on digits as 3x32x32 images (a few epochs: its
    weights have trained scales, not random ones)."""
    x, y = digits28()
    xt = torch.as_tensor(x).reshape(-1, 1, 28, 28)
    xt = torch.nn.functional.interpolate(xt, size=(32, 32), mode="bilinear",
                                         align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
    yt = torch.as_tensor(y)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 4, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, 1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(2048, 100), nn.ReLU(),
                        nn.Linear(100, 10))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(8):
        perm = torch.randperm(1500)
        for i in range(0, 1500, 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    acc = (net(xt[1500:]).argmax(1) == yt[1500:]).float().mean().item()
    print(f"wide 4-layer convnet (cifar_wide_kw architecture) on 3x32x32 digits: test "
          f"accuracy {acc:.3f}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (xt[:1],), str(path), dynamo=False, opset_version=17)


def root_once(path: str, eps: float, device: str = "cpu") -> None:
    """One root bound in this process (bound propagation on ``device``); prints a JSON line
    with its time and peak memory (host RSS; on CUDA also the device's peak)."""
    graph = lipcert.load(path)
    n = int(np.prod(graph.input_shape))
    x0 = np.random.default_rng(0).uniform(0.2, 0.8, n)
    t0 = time.perf_counter()
    try:
        result = lipcert.bound(graph, "local", "inf", center=x0, eps=eps, domain=(0.0, 1.0),
                               bab_time=0, self_check=False, device=device)
        value, unstable = result.upper, result.details["unstable_at_root"]
    except LipcertError as exc:
        value, unstable = str(exc), None
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if device.startswith("cuda"):
        peak = max(peak, torch.cuda.max_memory_allocated() / 2**30)
    print(json.dumps({"upper": value, "seconds": seconds, "peak_gib": peak,
                      "unstable": unstable}))


def bench_scale(eps: float, device: str = "cpu") -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wide = Path(tmp) / "cifar_wide_arch.onnx"
        train_wide_cnn(wide)
        models = [(name, SHARED_ONNX / f"{name}.onnx") for name in ("cifar_base_kw",
                                                                      "resnet_2b")]
        models = [(n, p) for n, p in models if p.exists()]
        if len(models) < 2:
            print("../shared/onnx is absent: cifar_base_kw and resnet_2b skipped")
        models.append(("wide 4-layer (cifar_wide_kw arch.)", wide))
        print(f"\nroot local linf bound (no branching), eps {eps:g}, device {device}, each in a "
              "fresh process (peak = its max RSS, model load included; on CUDA the larger of "
              "it and the GPU's peak allocation)")
        print(f"{'model':<36} {'unstable':>8} {'bound':>12} {'seconds':>8} {'peak GiB':>9}")
        for name, path in models:
            out = subprocess.run([sys.executable, __file__, "--root-once", str(path),
                                  "--eps", str(eps), "--device", device],
                                 capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            row = json.loads(out)
            value = row["upper"]
            shown = f"{value:>12.6g}" if isinstance(value, float) else f" {value[:60]}"
            print(f"{name:<36} {row['unstable'] or '-':>8} {shown} {row['seconds']:>8.1f} "
                  f"{row['peak_gib']:>9.2f}")


def _baseline_row(name: str, graph, x0: np.ndarray, eps: float) -> None:
    from alpha_crown_baseline import local_linf_bound

    from lipcert.ir.lowering import cached_affine_dag

    region = {"center": x0, "eps": eps, "domain": (0.0, 1.0)}
    values, seconds = [], []
    for steps in (0, None):
        options = {} if steps is None else {"optimize_steps": steps}
        t0 = time.perf_counter()
        result = lipcert.bound(graph, "local", "inf", bab_time=0, self_check=False,
                               **region, **options)
        seconds.append(time.perf_counter() - t0)
        values.append(result.details["exact_arithmetic_bound"])
    dag = cached_affine_dag(graph, "local", 10**8)
    low, high = np.clip(x0 - eps, 0, 1), np.clip(x0 + eps, 0, 1)
    t0 = time.perf_counter()
    base = local_linf_bound(dag, low, high)
    base_s = time.perf_counter() - t0
    if base is None:
        print(f"{name:<26} {eps:>6g}  (not a plain ReLU chain: no baseline)")
        return
    print(f"{name:<26} {eps:>6g} {values[0]:>12.4f} {values[1]:>12.4f} {base:>12.4f} "
          f"{values[1] / base:>8.4f} {seconds[0]:>7.1f} {seconds[1]:>7.1f} {base_s:>7.1f}")
    sys.stdout.flush()


def bench_baseline() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from certify_bab import DEFAULT_REPO, FOLDER, _show, read_instance

    print("root local linf bound: lipcert plain CROWN, lipcert alpha (default), the "
          "alpha-CROWN-style baseline (bench/alpha_crown_baseline.py); ratio = alpha / "
          "baseline; seconds of each")
    print(f"{'model':<26} {'eps':>6} {'plain':>12} {'alpha':>12} {'baseline':>12} "
          f"{'ratio':>8} {'s plain':>7} {'s alpha':>7} {'s base':>7}")
    x_cnn = np.load(ROOT / "models" / "digits_test.npz")["x"][0].reshape(-1)
    for name in ("digits_mlp", "digits_cnn"):
        graph = lipcert.load(ROOT / "models" / f"{name}.onnx")
        for eps in (0.005, 0.01, 0.02, 0.05):
            _baseline_row(name, graph, x_cnn, eps)
    if DEFAULT_REPO.exists():
        with tempfile.TemporaryDirectory() as tmp:
            for depth in (2, 4, 6):
                net = f"mnist-net_256x{depth}"
                path = Path(tmp) / f"{net}.onnx"
                path.write_bytes(_show(DEFAULT_REPO, f"{FOLDER}/{net}.onnx"))
                graph = lipcert.load(path)
                for eps in (0.03, 0.05):
                    x0, _ = read_instance(DEFAULT_REPO, 0, eps)
                    _baseline_row(net, graph, x0, eps)
    else:
        print(f"(no vnncomp2021 snapshot at {DEFAULT_REPO}: mnistfc nets skipped)")
    cifar = SHARED_ONNX / "cifar_base_kw.onnx"
    if cifar.exists():
        x0 = np.random.default_rng(0).uniform(0.2, 0.8, 3072)
        _baseline_row("cifar_base_kw", lipcert.load(cifar), x0, 0.002)
    else:
        print("(../shared/onnx is absent: cifar_base_kw skipped)")


def bench_case(budget: float = 60.0) -> None:
    case = ROOT.parent / "shared" / "cases" / "mnist256x2_x0.npy"
    net = SHARED_ONNX / "mnist-net_256x2.onnx"
    if not (case.exists() and net.exists()):
        print("../shared is absent: the mnist256x2 case is skipped")
        return
    graph = lipcert.load(net)
    x0 = np.load(case).reshape(-1)
    print(f"mnist-net_256x2, box x0 +- 0.03 in [0, 1] (exact 19.0962), {budget:g} s of BaB")
    print(f"{'optimize_steps':>14} {'root':>10} {'10 s':>10} {'30 s':>10} {'final':>10} "
          f"{'domains':>8} {'exact?':>6}  stopped")
    for steps in (20, 0):
        runs = [lipcert.bound(graph, "local", "inf", center=x0, eps=0.03, domain=(0.0, 1.0),
                              bab_time=t, optimize_steps=steps, self_check=False)
                for t in (10.0, 30.0, budget)]
        last = runs[-1]
        print(f"{steps:>14} {last.details['root_bound']:>10.4f} {runs[0].upper:>10.4f} "
              f"{runs[1].upper:>10.4f} {last.upper:>10.4f} {last.details['domains']:>8} "
              f"{'yes' if last.details['exact'] else 'no':>6}  {last.details['stopped']} "
              f"({last.details['bab_seconds']:.1f} s)")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eps", default="0.005,0.01,0.02,0.05")
    parser.add_argument("--budget", type=float, default=30.0)
    parser.add_argument("--scale", action="store_true", help="CIFAR-size root bounds only")
    parser.add_argument("--baseline", action="store_true",
                        help="root bounds beside the alpha-CROWN-style baseline")
    parser.add_argument("--case", action="store_true",
                        help="the mnist256x2 box of ../shared/cases, with and without beta")
    parser.add_argument("--root-once", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="--scale: where local runs (cuda)")
    args = parser.parse_args()
    if args.case:
        bench_case()
        return
    if args.baseline:
        bench_baseline()
        return
    if args.root_once:
        root_once(args.root_once, float(args.eps), args.device)
        return
    if args.scale:
        bench_scale(float(args.eps) if "," not in args.eps else 0.002, args.device)
        return
    eps_list = [float(e) for e in args.eps.split(",")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp784.onnx"
        x_mlp = train_mlp(path)
        bench("784-100-100-10 MLP", lipcert.load(path), x_mlp.astype(np.float64), eps_list,
              args.budget)
    x_cnn = np.load(ROOT / "models" / "digits_test.npz")["x"][0].reshape(-1)
    bench("models/digits_cnn.onnx", lipcert.load(ROOT / "models" / "digits_cnn.onnx"), x_cnn,
          eps_list, args.budget)


if __name__ == "__main__":
    main()
