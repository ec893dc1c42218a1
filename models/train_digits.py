"""Train the bundled example classifiers on scikit-learn's digits (8x8, no network needed)
and export them to ONNX next to this script, with a held-out test split.

    python models/train_digits.py          # writes models/*.onnx and models/digits_test.npz

Inputs are images in [0, 1] of shape (N, 1, 8, 8); each model declares a symbolic batch dim.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).resolve().parent


class MaxMin(nn.Module):
    """MaxMin activation (Anil et al. 2019): pairs (x_i, x_{i+n/2}) -> (max, min)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        return torch.cat([torch.maximum(a, b), torch.minimum(a, b)], dim=1)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


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
    raise ValueError(name)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 60) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
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
    for name in ("digits_mlp", "digits_cnn", "digits_maxmin", "digits_resnet"):
        model = build(name)
        train(model, xt, yt)
        with torch.no_grad():
            acc = (model(torch.from_numpy(x_te)).argmax(1).numpy() == y_te).mean()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.from_numpy(x_te[:1]),), str(HERE / f"{name}.onnx"),
                              input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              opset_version=17, dynamo=False)
        print(f"{name}: test accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
