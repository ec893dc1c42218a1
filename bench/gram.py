"""Benchmark: lipcert's gram bounds on a whole CIFAR ResNet-18 against the reference Gram
functions, layer by layer, in one run.

The network: ResNet-18 for 32x32 inputs (3x3 stem, no max-pool, BasicBlocks [2, 2, 2, 2]),
He-initialised convs, BatchNorm at its initial statistics, exported with torch's ONNX
exporter and read by lipcert (so BN is folded into the conv weights it bounds). For every
conv of the imported graph:

- lipcert (default settings): the layer bound ``lipcert bound -m gram`` uses, which
  candidate won (exact: the certified operator norm; semi: exact along one axis, circular
  along the other; circular: the circular embedding's norm; 1x1: the channel matrix) and
  its time;
- lipcert "fast" (semi_max_side=0, exact_max_cost=0): the circular candidate alone;
- Delattre et al. 2023 (ICML, Algorithm 3): Gram iteration on the DFT of the kernel at the
  input size n with per-iteration rescaling, in float32/complex64 as the reference code
  runs on float32 weights (re-implemented here from the paper, not vendored). It is the
  norm of the circular conv on n x n, not of the zero-padded one, ignores stride, and is
  not a certified bound in float32;
- Delattre et al. 2024 (arXiv 2402.00240, the zero-padding bound): Gram iteration on the
  kernel by self-convolution, then the max absolute row sum of the last iterate, with
  ``--iterations-2024`` iterations (each one roughly doubles the kernel size: 3 iterations
  take minutes per 512-channel layer on 2 cores);
- "exact": the zero-padded operator's norm by Lanczos (ARPACK, tol 1e-12) on the implicit
  operator (torch conv2d and its adjoint): a converged estimate, independent of lipcert.

Totals: time of the whole-model ``lipcert.bound(graph, "gram")`` (default settings, fresh
cache; without and with the soundness self-check, whose 8 sampled float64 Jacobians cost
about as much as the bound on this network) against the sum of each reference function's
per-layer times; peak memory.

    python bench/gram.py [--iterations-2023 6] [--iterations-2024 2] [--skip-2024]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse.linalg as spla
import torch
import torch.nn.functional as F
from torch import nn

import lipcert
from lipcert.estimators.gram.estimator import _conv_candidates
from lipcert.ir import ops as O


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU())
        layers, c_in = [], 64
        for c, s in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            layers += [Block(c_in, c, s), Block(c, c, 1)]
            c_in = c
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, 10)

    def forward(self, x):
        y = self.layers(self.stem(x))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def export_resnet18(path: Path) -> Path:
    torch.manual_seed(0)
    model = ResNet18()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    model.eval()
    torch.onnx.export(model, torch.randn(1, 3, 32, 32), path, dynamo=False,
                      input_names=["x"], output_names=["logits"])
    return path


def delattre2023(kernel: torch.Tensor, n: int, iterations: int) -> float:
    """Delattre et al. 2023, Algorithm 3: Gram iteration on the n x n DFT blocks, with the
    Frobenius rescaling carried in log space."""
    c_out, c_in = kernel.shape[:2]
    if c_in > c_out:
        kernel = kernel.transpose(0, 1)
        c_in, c_out = c_out, c_in
    g = torch.fft.rfft2(kernel, s=(n, n)).reshape(c_out, c_in, -1).permute(2, 0, 1)
    log_scale = torch.zeros(g.shape[0])
    for _ in range(iterations):
        r = g.norm(dim=(1, 2))
        g = g / r[:, None, None]
        log_scale = 2 * (log_scale + r.log())
        g = torch.bmm(g.mH, g)
    power = 0.5 ** iterations
    return float((g.norm(dim=(1, 2)).pow(power) * torch.exp(log_scale * power)).max())


def delattre2024(kernel: torch.Tensor, iterations: int) -> float:
    """Delattre et al. 2024 (zero padding): Gram iterates by kernel self-convolution, then
    the max absolute row sum of the last one (spectral rescaling's weights)."""
    if kernel.shape[1] > kernel.shape[0]:
        kernel = kernel.transpose(0, 1)
    k, log_scale = kernel, 0.0
    for _ in range(iterations):
        r = k.norm()
        k = k / r
        log_scale = 2 * (log_scale + float(r.log()))
        k = F.conv2d(k, k, padding=k.shape[-1] - 1)
    power = 0.5 ** iterations
    rows = k.abs().sum(dim=(1, 2, 3)).pow(power) * np.exp(log_scale * power)
    return float(rows.max())


def lanczos_norm(op: O.Conv, in_shape: tuple[int, ...]) -> float:
    w = torch.as_tensor(op.weight)
    t, l, b, r = op.pads

    def forward(x):
        return F.conv2d(F.pad(x, (l, r, t, b)), w, stride=op.stride, dilation=op.dilation,
                        groups=op.groups)

    n = int(np.prod(in_shape))

    def gram(v):
        x = torch.as_tensor(np.asarray(v, dtype=np.float64)).reshape(in_shape)
        x.requires_grad_(True)
        y = forward(x)
        (g,) = torch.autograd.grad(y, x, y.detach())
        return g.detach().reshape(-1).numpy()

    lin = spla.LinearOperator((n, n), matvec=gram, dtype=np.float64)
    value = spla.eigsh(lin, k=1, which="LA", tol=1e-12, ncv=min(n - 1, 40),
                       return_eigenvectors=False)
    return float(np.sqrt(value.max()))


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return value, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations-2023", type=int, default=6)
    parser.add_argument("--iterations-2024", type=int, default=2)
    parser.add_argument("--skip-2024", action="store_true")
    parser.add_argument("--skip-exact", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        graph = lipcert.load(export_resnet18(Path(tmp) / "resnet18.onnx"))
    from lipcert.estimators.base import _FACTORS
    fast, t_fast = timed(lipcert.bound, graph, "gram", self_check=False, semi_max_side=0,
                         exact_max_cost=0)
    _FACTORS.clear()
    whole, t_whole = timed(lipcert.bound, graph, "gram", self_check=False)
    _FACTORS.clear()  # fresh cache again: the second run pays for every layer too
    checked, t_checked = timed(lipcert.bound, graph, "gram")
    convs = [(node, graph.shape_of(node.inputs[0])) for node in graph.nodes
             if isinstance(node.op, O.Conv)]
    header = (f"{'conv':>4} {'shape':>20} {'lipcert':>9} {'how':>8} {'t':>6} {'fast':>9}"
              f" {'t':>6} {'D2023':>9} {'t':>6} {'D2024':>9} {'t':>6} {'exact':>9}"
              f" {'lc/ex':>8} {'D23/ex':>8} {'lc/D23':>7} {'lc/D24':>7}")
    print(header)
    print("-" * len(header))
    totals = dict(ours=0.0, fast=0.0, d23=0.0, d24=0.0)
    worst = worst_ours = 1.0
    for i, (node, in_shape) in enumerate(convs):
        op = node.op
        out_shape = node.shape
        cands, t_ours = timed(_conv_candidates, op, in_shape, out_shape, {})
        how = min(cands, key=cands.get)
        ours = cands[how]
        c_fast, t_fast_layer = timed(_conv_candidates, op, in_shape, out_shape,
                                     {"semi_max_side": 0, "exact_max_cost": 0})
        fast_layer = min(c_fast.values())
        kernel = torch.as_tensor(op.weight, dtype=torch.float32)
        d23, t23 = timed(delattre2023, kernel, in_shape[2], args.iterations_2023)
        if args.skip_2024:
            d24, t24 = float("nan"), 0.0
        else:
            d24, t24 = timed(delattre2024, kernel, args.iterations_2024)
        exact = float("nan") if args.skip_exact else lanczos_norm(op, in_shape)
        totals["ours"] += t_ours
        totals["fast"] += t_fast_layer
        totals["d23"] += t23
        totals["d24"] += t24
        if np.isfinite(exact):
            worst = max(worst, fast_layer / exact)
            worst_ours = max(worst_ours, ours / exact)
        shape = f"{op.weight.shape[0]}x{op.weight.shape[1]}x{op.weight.shape[2]}" \
                f"/s{op.stride[0]}@{in_shape[2]}"
        print(f"{i:4d} {shape:>20} {ours:9.5f} {how:>8} {t_ours:6.2f} {fast_layer:9.5f} "
              f"{t_fast_layer:6.2f} {d23:9.5f} {t23:6.2f} {d24:9.4f} {t24:6.2f} {exact:9.5f} "
              f"{ours / exact:8.5f} {d23 / exact:8.5f} {ours / d23:7.4f} {ours / d24:7.4f}")
        sys.stdout.flush()
    print("-" * len(header))
    print(f"whole-model lipcert.bound(graph, 'gram'): {whole.upper:.6g} in {t_whole:.2f} s "
          f"(default settings, fresh cache, self_check=False); with the soundness self-check "
          f"(8 sampled Jacobians): {t_checked:.2f} s")
    print(f"sum of per-layer times: lipcert {totals['ours']:.2f} s, fast {totals['fast']:.2f}"
          f" s, Delattre 2023 ({args.iterations_2023} it) {totals['d23']:.2f} s, Delattre 2024 "
          f"({args.iterations_2024} it) {totals['d24']:.2f} s")
    print(f"circular only (semi_max_side=0, exact_max_cost=0): {fast.upper:.6g} in "
          f"{t_fast:.2f} s")
    print(f"whole model / Delattre 2023 per-layer sum: {t_whole / totals['d23']:.3f} "
          f"(circular only: {t_fast / totals['d23']:.3f})")
    print(f"largest lipcert/exact over the layers: {worst_ours:.6f}; "
          f"largest fast/exact: {worst:.6f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (RSS): {peak:.0f} MB")


if __name__ == "__main__":
    main()
