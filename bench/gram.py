"""Benchmark: Gram-iteration bounds on the conv layers of a ResNet-18-shaped network at
CIFAR input size (random He-initialised weights).

For each layer: the certified gram bound (circular embedding, polyphase for stride), the
exact spectral norm of that circular operator (FFT + per-frequency SVD: what Gram iteration
converges to), power iteration on the true zero-padded operator (a lower estimate: the exact
zero-padded norm lies between it and the bound), and the time of each.

    python bench/gram.py [--iterations 10] [--device cpu|cuda] [--power-steps 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from lipcert.estimators.gram import core as G

# (name, c_in, c_out, kernel, stride, input size)
RESNET18 = [("conv1", 3, 64, 3, 1, 32)]
for stage, (c, n) in enumerate([(64, 32), (128, 16), (256, 8), (512, 4)], start=1):
    prev = 64 if stage == 1 else c // 2
    first_stride = 1 if stage == 1 else 2
    first_n = n if stage == 1 else 2 * n
    RESNET18 += [(f"layer{stage}.0.conv1", prev, c, 3, first_stride, first_n),
                 (f"layer{stage}.0.conv2", c, c, 3, 1, n),
                 (f"layer{stage}.1.conv1", c, c, 3, 1, n),
                 (f"layer{stage}.1.conv2", c, c, 3, 1, n)]
    if stage > 1:
        RESNET18.append((f"layer{stage}.0.shortcut", prev, c, 1, 2, first_n))


def circular_exact(weight, n, stride, pad, device):
    size = G.circular_size(n, pad, pad, weight.shape[2], stride, 1)
    kernel = G.polyphase_kernel(weight, (stride, stride), (1, 1))
    blocks, _ = G.conv_frequency_blocks(kernel, (size // stride,) * 2, device)
    return float(torch.linalg.matrix_norm(blocks, 2).max())


def power_iteration(weight, n, stride, pad, steps, device):
    w = torch.as_tensor(weight, device=device)
    x = torch.randn(1, weight.shape[1], n, n, dtype=torch.float64, device=device)
    sigma = 0.0
    for _ in range(steps):
        x = x / x.norm()
        y = F.conv2d(x, w, stride=stride, padding=pad)
        sigma = float(y.norm())
        x = torch.autograd.grad(F.conv2d(x.requires_grad_(), w, stride=stride, padding=pad),
                                x, y)[0].detach()
    return sigma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--power-steps", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    header = (f"{'layer':22} {'shape':>18} {'gram bound':>11} {'circ exact':>11} {'power it':>10}"
              f" {'gram/circ':>9} {'gram/power':>10} {'t gram':>7} {'t exact':>7} {'t power':>7}")
    print(header)
    print("-" * len(header))
    totals = np.zeros(3)
    for name, c_in, c_out, k, stride, n in RESNET18:
        weight = rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))
        pad = k // 2
        t0 = time.perf_counter()
        bound = G.conv_gram_bound(weight, (n, n), (stride,) * 2, (pad,) * 4, (1, 1), 1,
                                  args.iterations, args.device)
        t1 = time.perf_counter()
        exact = circular_exact(weight, n, stride, pad, args.device)
        t2 = time.perf_counter()
        power = power_iteration(weight, n, stride, pad, args.power_steps, args.device)
        t3 = time.perf_counter()
        totals += (t1 - t0, t2 - t1, t3 - t2)
        shape = f"{c_out}x{c_in}x{k}x{k}/s{stride}@{n}"
        print(f"{name:22} {shape:>18} {bound:11.5f} {exact:11.5f} {power:10.5f} "
              f"{bound / exact:9.6f} {bound / power:10.5f} {t1 - t0:7.3f} {t2 - t1:7.3f} "
              f"{t3 - t2:7.3f}")
    print("-" * len(header))
    print(f"{'total':22} {'':>18} {'':>11} {'':>11} {'':>10} {'':>9} {'':>10} "
          f"{totals[0]:7.3f} {totals[1]:7.3f} {totals[2]:7.3f}")


if __name__ == "__main__":
    main()
