"""Turns an ONNX ModelProto into a lipcert Graph.

Walks the nodes in topological order. Nodes whose inputs are all constants are folded with
the ONNX reference evaluator; the others go to their op handler. Every unsupported node is
collected (its outputs poison what depends on them) and all are reported at once.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from ..errors import InputError, ModelRefused, UnsupportedNode, UnsupportedOpsError
from ..ir.graph import Graph
from . import handlers  # noqa: F401  (registers handlers)
from .context import (
    Data,
    ImportContext,
    Malformed,
    Unsupported,
    check_size,
    max_value_elements,
    probe_tensor,
)
from .registry import HANDLERS

MIN_OPSET, MAX_OPSET = 7, 23
_FLOAT_INPUTS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def _fold(node: onnx.NodeProto, values: list[np.ndarray | None], model: onnx.ModelProto):
    """Evaluate a node with constant inputs by the ONNX reference implementation."""
    from onnx.reference import ReferenceEvaluator

    if node.op_type == "Constant":
        if len(node.attribute) != 1:
            raise Malformed(f"a Constant needs exactly one value attribute, it has "
                            f"{len(node.attribute)}")
        attr = node.attribute[0]
        value = helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            return [numpy_helper.to_array(value)]
        if attr.name == "sparse_value":
            raise Unsupported("sparse constants")
        return [np.asarray(value)]
    inputs, feeds = [], {}
    for k, (name, value) in enumerate(zip(node.input, values, strict=True)):
        if not name:
            inputs.append("")
            continue
        alias = f"in{k}"
        inputs.append(alias)
        feeds[alias] = value
    outputs = [f"out{k}" if name else "" for k, name in enumerate(node.output)]
    one = helper.make_node(node.op_type, inputs, outputs, domain=node.domain)
    one.attribute.extend(node.attribute)
    graph = helper.make_graph(
        [one], "fold",
        [helper.make_tensor_value_info(a, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for a, v in feeds.items()],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
         for o in outputs if o],
    )
    small = helper.make_model(graph, opset_imports=list(model.opset_import),
                              ir_version=model.ir_version)
    try:
        results = ReferenceEvaluator(small).run(None, feeds)
    except Exception as exc:
        raise Unsupported(f"cannot fold its constant inputs: {exc}") from None
    return list(results)


def _input_spec(model: onnx.ModelProto) -> tuple[onnx.ValueInfoProto, list[str]]:
    initializers = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in initializers]
    if len(real) != 1:
        names = [i.name for i in real]
        raise ModelRefused(f"the model has {len(real)} inputs {names}; lipcert bounds models "
                           "with exactly one input tensor")
    spec = real[0]
    notes = []
    tt = spec.type.tensor_type
    if not spec.type.HasField("tensor_type"):
        raise ModelRefused(f"input {spec.name!r} is not a tensor; lipcert bounds models with "
                           "one float tensor input")
    if tt.elem_type not in _FLOAT_INPUTS:
        name = onnx.TensorProto.DataType.Name(tt.elem_type) if tt.elem_type in \
            onnx.TensorProto.DataType.values() else str(tt.elem_type)
        raise ModelRefused(f"input {spec.name!r} has element type {name}; lipcert bounds "
                           "models with a float input (float, double or float16)")
    if not tt.HasField("shape"):
        raise ModelRefused(f"input {spec.name!r} has no declared shape")
    return spec, notes


def concrete_input_shape(spec: onnx.ValueInfoProto) -> tuple[tuple[int, ...], list[str]]:
    dims, notes = [], []
    for k, d in enumerate(spec.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            label = d.dim_param or "?"
            dims.append(1)
            notes.append(f"symbolic input dim {k} ({label}) fixed to 1: the bound is per sample")
    return tuple(dims), notes


def _import_node(ctx: ImportContext, node: onnx.NodeProto, model: onnx.ModelProto,
                 problems: list[UnsupportedNode]) -> None:
    """Fold a node with constant inputs, hand the others to their handler; an unsupported
    node is recorded and poisons its outputs (so what depends on it is named too)."""
    ctx.node = node
    _check_outputs(ctx, node)
    ctx.defined.update(o for o in node.output if o)
    present = [i for i in node.input if i]
    if any(i in ctx.poisoned for i in present):
        # downstream of an unsupported node: still name it if lipcert cannot handle it
        if node.domain not in ("", "ai.onnx") or node.op_type not in HANDLERS:
            problems.append(UnsupportedNode(node.op_type, ctx.node_name,
                                            "no handler for this op"))
        ctx.poisoned.update(node.output)
        return
    unknown = [i for i in present if i not in ctx.data and i not in ctx.consts]
    if unknown:
        raise InputError(f"node {ctx.node_name!r} ({node.op_type}) reads {unknown}, which "
                         "no earlier node produces (graph not topologically sorted?)")
    try:
        if node.domain not in ("", "ai.onnx"):
            raise Unsupported(f"op from domain {node.domain!r}")
        if all(i in ctx.consts for i in present):
            values = [ctx.consts[i] if i else None for i in node.input]
            for k, value in enumerate(_fold(node, values, model)):
                if k < len(node.output) and node.output[k]:
                    ctx.consts[node.output[k]] = np.asarray(value)
            return
        handler = HANDLERS.get(node.op_type)
        if handler is None:
            raise Unsupported("no handler for this op")
        handler(ctx)
    except Unsupported as exc:
        problems.append(UnsupportedNode(node.op_type, ctx.node_name, str(exc)))
        ctx.poisoned.update(node.output)
    except (InputError, ModelRefused):
        raise
    except Exception as exc:  # Malformed, or a handler that met numbers it cannot use
        raise malformed_node(ctx, exc) from None


def malformed_node(ctx: ImportContext, exc: Exception) -> InputError:
    """One line naming the node and what does not fit: a malformed model is an input error."""
    reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    if not isinstance(exc, Malformed | MemoryError):
        reason = f"{type(exc).__name__}: {reason}"
    return InputError(f"node {ctx.node_name!r} ({ctx.node.op_type}) cannot be read: {reason}. "
                      "The model is malformed (onnx.checker.check_model(model, full_check=True) "
                      "says more), or lipcert misreads this node: please report it if "
                      "onnxruntime runs the model")


def _check_outputs(ctx: ImportContext, node: onnx.NodeProto) -> None:
    """Every node writes at least one value, and no value is written twice (SSA form)."""
    outs = [o for o in node.output if o]
    if not outs:
        raise InputError(f"node {ctx.node_name!r} ({node.op_type}) has no outputs; the model "
                         "is malformed")
    twice = [o for o in outs if o in ctx.defined]
    if twice or len(set(outs)) != len(outs):
        name = twice[0] if twice else next(o for o in outs if outs.count(o) > 1)
        raise InputError(f"node {ctx.node_name!r} ({node.op_type}) writes the value {name!r}, "
                         "which the graph input, an initializer or another node already "
                         "defines; the model is malformed (ONNX values are written once)")


def build_graph(model: onnx.ModelProto) -> Graph:
    """Import ``model``; raises UnsupportedOpsError listing every unsupported node."""
    opset = default_opset(model)
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelRefused(f"the model uses ONNX opset {opset}; lipcert supports opsets "
                           f"{MIN_OPSET} to {MAX_OPSET} (re-export with another opset)")
    g = model.graph
    spec, _ = _input_spec(model)
    input_shape, notes = concrete_input_shape(spec)
    if len(g.output) != 1:
        raise ModelRefused(f"the model has {len(g.output)} outputs "
                           f"{[o.name for o in g.output]}; lipcert bounds single-output models")
    check_size(input_shape, f"input {spec.name!r}", max_value_elements())
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    ctx = ImportContext(opset, used)
    ctx.defined = {spec.name} | {t.name for t in g.initializer}
    for t in g.initializer:
        try:
            ctx.consts[t.name] = numpy_helper.to_array(t)
        except Exception as exc:
            raise InputError(f"cannot read initializer {t.name!r}: {exc}") from None
    ctx.data[spec.name] = Data(probe_tensor(input_shape))
    problems: list[UnsupportedNode] = []
    with torch.no_grad():
        for node in g.node:
            _import_node(ctx, node, model, problems)
    if problems:
        raise UnsupportedOpsError(problems)
    out = g.output[0].name
    if out in ctx.consts:
        raise ModelRefused(f"output {out!r} does not depend on the input (a constant)")
    if out not in ctx.data:
        raise ModelRefused(f"output {out!r} is not produced by any node")
    if out == spec.name:
        raise InputError("the model's graph is empty: its output is its input")
    return Graph(spec.name, input_shape, out, tuple(ctx.nodes), tuple(notes),
                 meta={"opset": opset, "onnx_nodes": len(g.node)})
