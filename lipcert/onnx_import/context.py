"""State of one import: values (constants or data tensors of known shape), emitted IR
nodes, and the helpers every op handler uses."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import InputError, positive_int_env
from ..ir import evaluate
from ..ir import ops as O
from ..ir.graph import Node


class Unsupported(Exception):
    """Raised by a handler: this node cannot be imported, for the reason given."""


class Malformed(Exception):
    """Raised while importing a node that does not make sense (its attributes or constants
    do not fit its inputs): an input error naming the node, never an internal error."""


MAX_VALUES_ENV = "LIPCERT_MAX_VALUE_ELEMENTS"
DEFAULT_MAX_VALUES = 1 << 24  # 16.8M numbers per tensor (a 224x224 image has 0.15M)


def max_value_elements() -> int:
    """The largest tensor (input or intermediate) lipcert accepts, in elements."""
    return positive_int_env(MAX_VALUES_ENV, DEFAULT_MAX_VALUES, "elements")


@dataclass
class Data:
    """A value that depends on the model input; ``probe`` is a sample tensor of its shape."""

    probe: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.probe.shape)


_CPU_ELEMENTS = 1 << 20
_MAY_GROW = (O.Pad, O.ConvTranspose)  # outputs can be far larger than their inputs


def probe_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """A shape carrier: real zeros when small (so values are checked too, e.g. an index
    out of range), a meta tensor (no memory) when large."""
    size = math.prod(shape)
    return _zeros(shape) if size <= _CPU_ELEMENTS else torch.empty(shape, device="meta")


def _zeros(shape) -> torch.Tensor:
    return torch.zeros(tuple(shape), dtype=torch.float64)


def _run(op: O.Op, probes: list[torch.Tensor]) -> torch.Tensor:
    try:  # build_graph runs under torch.no_grad()
        return evaluate.apply(op, *probes)
    except Exception as exc:
        raise Malformed(f"does not fit its inputs of shape "
                        f"{[tuple(p.shape) for p in probes]}: {exc}") from None


def check_size(shape: tuple[int, ...], what: str, limit: int) -> None:
    """Refuse a tensor above ``limit`` values (LIPCERT_MAX_VALUE_ELEMENTS), naming it."""
    size = math.prod(shape)
    if size > limit:
        raise InputError(f"{what} has shape {tuple(shape)} ({size:,} values), above the limit "
                         f"of {limit:,}; set {MAX_VALUES_ENV}=N to allow larger tensors")


def infer(op: O.Op, probes: list[torch.Tensor], limit: int, what: str) -> torch.Tensor:
    """The op applied to shape carriers: on the CPU when inputs are small and the op cannot
    blow up; otherwise on torch's meta device first (shapes only, no allocation), then,
    once the output is known to be within ``limit`` and small, on real zeros so that value
    errors (an index out of range) show too."""
    if all(not p.is_meta for p in probes) and not isinstance(op, _MAY_GROW):
        probe = _run(op, probes)
    else:
        probe = _run(op, [torch.empty(p.shape, device="meta") for p in probes])
    check_size(tuple(probe.shape), what, limit)
    if probe.is_meta and probe.numel() <= _CPU_ELEMENTS:
        probe = _run(op, [_zeros(p.shape) for p in probes])
    return probe


class ImportContext:
    """Holds every value seen so far; handlers read inputs and emit IR nodes through it."""

    def __init__(self, opset: int, used_values: set[str]):
        self.opset = opset
        self.used_values = used_values
        self.consts: dict[str, np.ndarray] = {}
        self.data: dict[str, Data] = {}
        self.poisoned: set[str] = set()
        self.defined: set[str] = set()  # every value name written so far
        self.max_values = max_value_elements()
        self._name: str | None = None
        self.nodes: list[Node] = []
        self._node: onnx.NodeProto | None = None
        self._counter = 0

    # -- reading the current node ---------------------------------------------------
    @property
    def node(self) -> onnx.NodeProto | None:
        return self._node

    @node.setter
    def node(self, node: onnx.NodeProto | None) -> None:
        self._node, self._name = node, None

    @property
    def node_name(self) -> str:
        assert self.node is not None
        if self._name is None:
            first = self.node.output[0] if self.node.output else "?"
            self._name = self.node.name or f"{self.node.op_type}->{first}"
        return self._name

    def attr(self, name: str, default=None):
        assert self.node is not None
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                if isinstance(value, bytes):
                    return value.decode()
                if isinstance(value, onnx.TensorProto):
                    return numpy_helper.to_array(value)
                return value
        return default

    def input_name(self, i: int) -> str | None:
        assert self.node is not None
        if i < len(self.node.input) and self.node.input[i]:
            return self.node.input[i]
        return None

    def n_inputs(self) -> int:
        assert self.node is not None
        return len(self.node.input)

    def is_data(self, i: int) -> bool:
        name = self.input_name(i)
        return name is not None and name in self.data

    def const(self, i: int, required: bool = True) -> np.ndarray | None:
        name = self.input_name(i)
        if name is None or name not in self.consts:
            if required:
                what = "missing" if name is None else "computed from the model input"
                raise Unsupported(f"input {i} ({name}) must be a constant, but it is {what}")
            return None
        return self.consts[name]

    def const_ints(self, i: int) -> list[int] | None:
        value = self.const(i, required=False)
        return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]

    def data_input(self, i: int) -> str:
        name = self.input_name(i)
        if name is None or name not in self.data:
            raise Unsupported(f"input {i} must be computed from the model input")
        return name

    def shape(self, value: str) -> tuple[int, ...]:
        return self.data[value].shape

    def output_used(self, i: int) -> bool:
        assert self.node is not None
        return i < len(self.node.output) and self.node.output[i] in self.used_values

    # -- writing ----------------------------------------------------------------------
    def emit(self, op: O.Op, inputs: list[str] | tuple[str, ...], out: str | None = None) -> str:
        """Append an IR node; returns the name of its output value."""
        self._check_finite(op)
        probe = infer(op, [self.data[i].probe for i in inputs], self.max_values,
                      f"node {self.node_name!r} ({self.node.op_type}) makes a tensor that")
        if out is None:
            self._counter += 1
            out = f"{self.node.output[0] if self.node and self.node.output else 'v'}" \
                  f"#{self._counter}"
        self.nodes.append(Node(op, tuple(inputs), out, tuple(probe.shape), self.node_name))
        self.data[out] = Data(probe)
        return out

    def _check_finite(self, op: O.Op) -> None:
        """Every number an op carries must be finite (NaN never; inf only where the op's
        semantics define it, e.g. a one-sided Clip limit)."""
        allowed = getattr(op, "infinite_ok", ())
        for f in fields(op):  # type: ignore[arg-type]
            value = getattr(op, f.name)
            if isinstance(value, np.ndarray):
                if np.issubdtype(value.dtype, np.number) and not np.all(np.isfinite(value)):
                    bad = "NaN or infinite values"
                else:
                    continue
            elif isinstance(value, float | int | np.number) and not isinstance(value, bool):
                if math.isnan(value) or (math.isinf(value) and f.name not in allowed):
                    bad = f"the value {value}"
                else:
                    continue
            elif isinstance(value, tuple) and value and all(
                    isinstance(v, float | int) for v in value):
                if all(math.isfinite(v) for v in value):
                    continue
                bad = f"the values {list(value)}"
            else:
                continue
            raise InputError(f"node {self.node_name!r} ({self.node.op_type}): its {f.name} "
                             f"has {bad}; lipcert bounds only models whose numbers are finite")

    def bind(self, out_index: int, value: str) -> None:
        """The node's output ``out_index`` is the data value ``value``."""
        assert self.node is not None
        name = self.node.output[out_index]
        if value == name:
            return
        if self.nodes and self.nodes[-1].output == value and "#" in value \
                and self.nodes[-1].source == self.node_name:
            # rename the last emitted node's output to the ONNX name for readability
            last = self.nodes.pop()
            self.nodes.append(Node(last.op, last.inputs, name, last.shape, last.source))
            self.data[name] = self.data.pop(value)
            return
        self.emit(O.Reshape(self.shape(value)), [value], out=name)

    def set_const(self, out_index: int, value: np.ndarray) -> None:
        assert self.node is not None
        self.consts[self.node.output[out_index]] = np.asarray(value)
