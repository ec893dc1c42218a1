"""Canonical op kinds of the lipcert IR and the facts estimators need about them.

Every op works on one tensor of the model's own concrete shape (symbolic dims fixed to 1):
the Lipschitz constant is that of the map from the flattened model input to the flattened
output. Weights live inside the op (as onnx2torch folds constant inputs); data edges are the
node inputs. Arrays are float64 numpy arrays. Ops carry no bounding algorithm: each estimator
owns a table from op class to handler (as in jax_verify).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np


class Op:
    """Base of all IR ops. ``arity`` is the number of data inputs (-1: variadic)."""

    arity = 1
    linear = False  # affine in its input (biases allowed)

    @property
    def kind(self) -> str:
        return type(self).__name__

    def arrays(self) -> dict[str, np.ndarray]:
        return {f.name: getattr(self, f.name) for f in fields(self)  # type: ignore[arg-type]
                if isinstance(getattr(self, f.name), np.ndarray)}

    def parameters(self) -> dict[str, np.ndarray]:
        """The op's weights: its floating-point arrays (not index arrays such as groups)."""
        return {k: a for k, a in self.arrays().items() if np.issubdtype(a.dtype, np.floating)}

    def describe(self) -> str:
        parts = []
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, np.ndarray):
                parts.append(f"{f.name}={'x'.join(map(str, v.shape)) or 'scalar'}")
            elif v is not None:
                parts.append(f"{f.name}={v}")
        return ", ".join(parts)


# --- affine ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dense(Op):
    """y[..., i, ...] = sum_j weight[i, j] x[..., j, ...] + bias[i], contracting ``axis``."""

    weight: np.ndarray
    bias: np.ndarray | None
    axis: int
    linear = True


@dataclass(frozen=True, eq=False)
class Conv(Op):
    """2-D convolution on an (N, C, H, W) tensor with explicit zero ``pads`` (t, l, b, r)."""

    weight: np.ndarray  # (C_out, C_in / groups, kh, kw)
    bias: np.ndarray | None
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int
    linear = True


@dataclass(frozen=True, eq=False)
class ConvTranspose(Op):
    """2-D transposed convolution; the full output is cropped by ``pads`` (t, l, b, r)."""

    weight: np.ndarray  # (C_in, C_out / groups, kh, kw)
    bias: np.ndarray | None
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    output_padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    linear = True


@dataclass(frozen=True, eq=False)
class Scale(Op):
    """Elementwise affine y = scale * x + shift (arrays broadcast to the tensor's rank)."""

    scale: np.ndarray
    shift: np.ndarray
    linear = True


@dataclass(frozen=True, eq=False)
class Add(Op):
    """y = sum_i coeffs[i] * x_i over data inputs of one shape (residual Add, Sub)."""

    coeffs: tuple[float, ...]
    arity = -1
    linear = True


@dataclass(frozen=True, eq=False)
class Concat(Op):
    axis: int
    arity = -1
    linear = True


@dataclass(frozen=True, eq=False)
class Reshape(Op):
    shape: tuple[int, ...]
    linear = True


@dataclass(frozen=True, eq=False)
class Transpose(Op):
    perm: tuple[int, ...]
    linear = True


@dataclass(frozen=True, eq=False)
class Slice(Op):
    """Selects x[start:stop:step] along ``axis`` (a coordinate projection)."""

    axis: int
    start: int
    stop: int
    step: int
    linear = True


@dataclass(frozen=True, eq=False)
class Pad(Op):
    """Constant padding; ``pads`` lists (begin, end) per axis."""

    pads: tuple[tuple[int, int], ...]
    value: float
    linear = True


@dataclass(frozen=True, eq=False)
class AvgPool(Op):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    ceil_mode: bool
    count_include_pad: bool
    linear = True


@dataclass(frozen=True, eq=False)
class GlobalAvgPool(Op):
    linear = True


# --- nonlinear -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Relu(Op):
    pass


@dataclass(frozen=True, eq=False)
class LeakyRelu(Op):
    alpha: float


@dataclass(frozen=True, eq=False)
class Sigmoid(Op):
    pass


@dataclass(frozen=True, eq=False)
class Tanh(Op):
    pass


@dataclass(frozen=True, eq=False)
class Elu(Op):
    """alpha (e^x - 1) for x < 0, x for x >= 0 (alpha >= 0: increasing, derivative in
    [0, max(alpha, 1)], a kink at 0 unless alpha = 1)."""

    alpha: float


@dataclass(frozen=True, eq=False)
class Softplus(Op):
    """log(1 + e^x): increasing, convex, derivative sigmoid(x) in (0, 1)."""


@dataclass(frozen=True, eq=False)
class Gelu(Op):
    """x Phi(x) with Phi the standard normal CDF (ONNX Gelu, approximate="none"): not
    monotone; its derivative Phi(x) + x phi(x) is largest at sqrt(2), smallest at
    -sqrt(2), and its minimum value is at the root of the derivative near -0.752."""


@dataclass(frozen=True, eq=False)
class Silu(Op):
    """x sigmoid(x) (SiLU / swish, imported from Mul(x, Sigmoid(x))): not monotone; its
    derivative is largest at the root c of x tanh(x / 2) = 2, smallest at -c, and its
    minimum value is at the root of the derivative near -1.278."""


@dataclass(frozen=True, eq=False)
class Clip(Op):
    """Elementwise clamp to [low, high] (ReLU6, hardtanh); slope in [0, 1].

    Either limit may be infinite (``torch.clamp(x, max=c)``, ``Min(x, c)`` import as
    Clip(-inf, c)); every method handles that case explicitly. NaN limits are refused at
    import. low >= high is the constant ``high`` (ONNX and torch agree)."""

    low: float
    high: float
    infinite_ok = ("low", "high")


@dataclass(frozen=True, eq=False)
class Softmax(Op):
    """Softmax over the trailing axes from ``axis`` when ``flatten`` (opset < 13), else one axis."""

    axis: int
    flatten: bool = False


@dataclass(frozen=True, eq=False)
class GroupSort(Op):
    """Sorts values within groups along ``axis``, descending.

    ``groups`` is an int array (n_groups, g) of positions along ``axis``; the r-th largest
    value of x[groups[k]] is written to position groups[k, r]. MaxMin is g = 2.
    GroupSort is 1-Lipschitz in l2 and linf (Anil, Lucas, Grosse, ICML 2019).
    """

    axis: int
    groups: np.ndarray


@dataclass(frozen=True, eq=False)
class MaxPool(Op):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pads: tuple[int, int, int, int]
    dilation: tuple[int, int]
    ceil_mode: bool


@dataclass(frozen=True, eq=False)
class Extremum(Op):
    """Elementwise max or min of several data inputs (before MaxMin recognition)."""

    mode: str  # "max" | "min"
    arity = -1


@dataclass(frozen=True, eq=False)
class Reduce(Op):
    """Max or min over ``axes`` (ReduceMax/ReduceMin, torch amax/amin/max(dim)). The
    groups it reduces are disjoint, so it is 1-Lipschitz in l2 and linf; inside a GroupSort
    export form the order-statistics pass replaces it with the GroupSort it belongs to."""

    mode: str  # "max" | "min"
    axes: tuple[int, ...]
    keepdims: bool


# Slope ranges [alpha, beta] of elementwise activations (derivative bounds; docs/ARCHITECTURE.md).
def slope_range(op: Op) -> tuple[float, float] | None:
    """Return [alpha, beta] with alpha <= f'(t) <= beta for all t, or None if not elementwise."""
    if isinstance(op, Relu):
        return (0.0, 1.0)
    if isinstance(op, LeakyRelu):
        return (min(op.alpha, 1.0), max(op.alpha, 1.0))
    if isinstance(op, Sigmoid):
        return (0.0, 0.25)
    if isinstance(op, Tanh):
        return (0.0, 1.0)
    if isinstance(op, Clip):
        return (0.0, 1.0) if op.high > op.low else (0.0, 0.0)
    if isinstance(op, Elu):
        return (0.0, max(float(op.alpha), 1.0))
    if isinstance(op, Softplus):
        return (0.0, 1.0)
    if isinstance(op, Gelu):
        return SMOOTH_EXTREMA["gelu"]["slopes"]
    if isinstance(op, Silu):
        return SMOOTH_EXTREMA["silu"]["slopes"]
    return None


#: Extremes of the non-monotone smooth activations, each widened outwards by 1e-9 (the
#: exact values, from the critical points named in the op docstrings, solved to 1e-15 in
#: float64: GELU' in [-0.128904145185155, 1.128904145185155], min GELU -0.169971207479904 at
#: -0.751791524693564; SiLU' in [-0.099839320128867, 1.099839320128867] with c =
#: 2.399357280515468, min SiLU -0.278464542761074 at -1.278464542761074). ``slopes``
#: bounds the derivative everywhere, ``peaks`` are the points where it is extreme (in
#: [low, high] order), ``minimum`` bounds the function below everywhere, at ``argmin``.
SMOOTH_EXTREMA = {
    "gelu": {"slopes": (-0.128904146, 1.128904146), "peaks": (-math.sqrt(2.0), math.sqrt(2.0)),
             "minimum": -0.169971208, "argmin": -0.7517915246935641},
    "silu": {"slopes": (-0.099839322, 1.099839322),
             "peaks": (-2.3993572805154675, 2.3993572805154675),
             "minimum": -0.278464543, "argmin": -1.2784645427610741},
}

ELEMENTWISE_ACTIVATIONS = (Relu, LeakyRelu, Sigmoid, Tanh, Clip, Elu, Softplus, Gelu, Silu)
