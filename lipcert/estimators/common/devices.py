"""The arithmetic bound propagation may use on a device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def dot_product_arithmetic(device: str | torch.device) -> Iterator[None]:
    """Convolutions computed as sums of products on ``device``.

    The rounding slack of bound propagation covers dot products, whose float64 error is at
    most gamma_n |a|^T |b| in any order (Higham, Accuracy and Stability, 2nd ed., Sec. 3.1).
    On CUDA, cuDNN may pick FFT or Winograd convolution algorithms, whose errors are
    normwise, not componentwise, so cuDNN is off here and torch's own im2col + GEMM
    convolution runs. On the CPU float64 convolutions are already GEMM-based."""
    if torch.device(device).type != "cuda":
        yield
        return
    with torch.backends.cudnn.flags(enabled=False):
        yield
