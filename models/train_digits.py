"""Train the bundled example classifiers on scikit-learn's digits (8x8, no network needed)
and export them to ONNX next to this script, with a held-out test split.

    python models/train_digits.py          # writes models/*.onnx and models/digits_test.npz
    python models/train_digits.py digits_lip   # only the named models

Inputs are images in [0, 1] of shape (N, 1, 8, 8); each model declares a symbolic batch dim.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn.utils import parametrize

HERE = Path(__file__).resolve().parent


class MaxMin(nn.Module):
    """MaxMin activation (Anil et al. 2019): pairs (x_i, x_{i+n/2}) -> (max, min)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class GroupSort2(nn.Module):
    """GroupSort with groups of 2 (consecutive pairs sorted ascending), written as
    deel-torchlip writes it: reshape to pairs, amin/amax over the pair axis, concatenate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pairs = x.reshape(x.shape[0], -1, 2)
        return torch.cat([pairs.amin(-1, keepdim=True), pairs.amax(-1, keepdim=True)],
                         -1).reshape(x.shape)


def orthogonal_linear(n_in: int, n_out: int) -> nn.Module:
    """A linear layer whose weight stays (semi-)orthogonal while training: norm exactly 1."""
    return nn.utils.parametrizations.orthogonal(nn.Linear(n_in, n_out))


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class SLL(nn.Module):
    """SDP-based Lipschitz layer (Araujo, Havens, Delattre, Allauzen, Hu, ICLR 2023, Thm 3):
    x - 2 W T^-1 relu(W^T x + b), T = diag(sum_j |W^T W|_ij q_j / q_i), 1-Lipschitz in l2
    for every W, b and q > 0 (here q = exp(s))."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, hidden) / width ** 0.5)
        self.bias = nn.Parameter(torch.zeros(hidden))
        self.log_q = nn.Parameter(torch.zeros(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.exp(self.log_q)
        t = (torch.abs(self.weight.T @ self.weight) * q[None, :] / q[:, None]).sum(1)
        return x - 2.0 * (torch.relu(x @ self.weight + self.bias) / t) @ self.weight.T


def build(name: str) -> nn.Module:
    if name == "digits_mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32),
                             nn.ReLU(), nn.Linear(32, 10))
    if name == "digits_cnn":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    if name == "digits_maxmin":
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), MaxMin(), nn.Linear(64, 32),
                             MaxMin(), nn.Linear(32, 10))
    if name == "digits_resnet":
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), ResidualBlock(8),
                             nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    if name == "digits_lip":  # 1-Lipschitz by construction (l2): claimed constant 1
        return nn.Sequential(nn.Flatten(), orthogonal_linear(64, 64), GroupSort2(),
                             orthogonal_linear(64, 64), GroupSort2(), orthogonal_linear(64, 10))
    if name == "digits_sll":  # residual 1-Lipschitz layers (SLL): claimed constant 1
        return nn.Sequential(nn.Flatten(), SLL(64, 128), SLL(64, 128), SLL(64, 128),
                             orthogonal_linear(64, 10))
    raise ValueError(name)


#: what training claims for the 1-Lipschitz model: its l2 constant is at most 1, so a sample
#: with logit margin m is robust within m / sqrt(2) (Tsuzuku et al., NeurIPS 2018)
LIP_CLAIMS = {name: {"model": f"{name}.onnx", "lipschitz_l2": 1.0, "eps": 0.25}
              for name in ("digits_lip", "digits_sll")}


def train_lipschitz(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    epochs: int = 150) -> None:
    """Cross-entropy on logits scaled by a temperature, with the true logit lowered by a
    margin (as in deel-lip's margin losses): pushes margins up without changing L."""
    onehot = nn.functional.one_hot(y, 10).float()
    fit(model, x, y, torch.optim.Adam(model.parameters(), lr=1e-2), epochs,
        lambda out, idx: nn.functional.cross_entropy(8.0 * (out - 0.5 * onehot[idx]), y[idx]))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 60) -> None:
    fit(model, x, y, torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4), epochs,
        lambda out, idx: nn.functional.cross_entropy(out, y[idx]))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, opt, epochs: int, loss) -> None:
    """Mini-batches of 64 in a fresh random order each epoch; ``loss(outputs, indices)``."""
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss(model(x[idx]), idx).backward()
            opt.step()
    model.eval()


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=0.25,
                                              random_state=0, stratify=digits.target)
    np.savez_compressed(HERE / "digits_test.npz", x=x_te, y=y_te.astype(np.int64))
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    names = sys.argv[1:] or ["digits_mlp", "digits_cnn", "digits_maxmin", "digits_resnet",
                             "digits_lip", "digits_sll"]
    for name in names:
        if name in LIP_CLAIMS:  # their own seed: the others train as they always did
            torch.manual_seed(0)
            model = build(name)
            train_lipschitz(model, xt, yt)
            for module in model.modules():  # the trained weights, without the parametrization
                if parametrize.is_parametrized(module):
                    parametrize.remove_parametrizations(module, "weight")
        else:
            model = build(name)
            train(model, xt, yt)
        with torch.no_grad():
            logits = model(torch.from_numpy(x_te))
        acc = (logits.argmax(1).numpy() == y_te).mean()
        if name in LIP_CLAIMS:
            write_claim(name, logits, y_te)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(x_te[:1]),), str(HERE / f"{name}.onnx"),
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17, dynamo=False)
        print(f"{name}: test accuracy {acc:.3f}")


def write_claim(name: str, logits: torch.Tensor, labels: np.ndarray) -> None:
    """The certified accuracy training claims from L = 1, written beside the model."""
    true = logits[torch.arange(len(labels)), torch.from_numpy(labels)]
    others = logits.clone()
    others[torch.arange(len(labels)), torch.from_numpy(labels)] = -torch.inf
    margin = (true - others.max(1).values).numpy()
    base = LIP_CLAIMS[name]
    claim = dict(base, certified_accuracy=float(np.mean(
        margin / np.sqrt(2) / base["lipschitz_l2"] > base["eps"])))
    (HERE / f"{name}.claim.json").write_text(json.dumps(claim, indent=2) + "\n")
    print(f"{name}: claimed certified accuracy at eps {claim['eps']}: "
          f"{claim['certified_accuracy']:.3f}")


if __name__ == "__main__":
    main()
