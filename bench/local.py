"""Benchmark: local linf Lipschitz bounds (Clarke-Jacobian bound propagation + BaB).

Models: a 784-100-100-10 ReLU MLP trained here on scikit-learn's digits upsampled to 28x28
(real data, no download; inputs in [0, 1]), and the bundled models/digits_cnn.onnx. For a
test sample and several eps (box x0 +- eps within [0, 1]) it reports: the bound without
branching, the BaB bound after 10 s and after 30 s (read from one 30 s run's progress: every
reported value is a valid bound at that moment), the sampled lower bound in the box
(``lower``), the exact local value when BaB closed the gap, and the global naive linf bound.

    python bench/local.py [--eps 0.005,0.01,0.02,0.05] [--budget 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

import lipcert

ROOT = Path(__file__).resolve().parents[1]


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
        seen: list[dict] = []
        t0 = time.perf_counter()
        bab = lipcert.bound(graph, "local", "inf", bab_time=budget, progress=seen.append,
                            **region)
        elapsed = time.perf_counter() - t0
        at10 = [s["upper"] for s in seen if s["elapsed"] <= 10.0]
        margin = bab.details["float32_margin"]
        b10 = at10[-1] * margin if at10 and elapsed > 10 else bab.upper
        lower = lipcert.bound(graph, "lower", "inf", **region).lower
        print(f"{eps:>7g} {root.details['unstable_at_root']:>8} {root.upper:>10.4f} "
              f"{b10:>10.4f} {bab.upper:>10.4f} {bab.details['domains']:>8} "
              f"{bab.lower or 0:>10.4f} {'yes' if bab.details['exact'] else 'no':>6} "
              f"{lower:>10.4f}   ({bab.details['stopped']}, {elapsed:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eps", default="0.005,0.01,0.02,0.05")
    parser.add_argument("--budget", type=float, default=30.0)
    args = parser.parse_args()
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
