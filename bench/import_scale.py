"""Import time against graph length: long ReLU chains and residual Add chains.

    python bench/import_scale.py [--sizes 1000,10000,100000] [--no-verify]

Each model is built with onnx.helper (no exporter), saved, and read with ``lipcert.load``
(parse, import, canonicalising passes, and the onnxruntime check unless --no-verify). The
stages are timed separately so that a super-linear pass shows up as a growing seconds per
1,000 nodes. Never asserted in tests: timings belong here.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def relu_chain(n_nodes: int, width: int = 4) -> onnx.ModelProto:
    """x -> Gemm -> Relu -> Relu -> ... (n_nodes nodes in all)."""
    w = numpy_helper.from_array(np.eye(width, dtype=np.float32), "W")
    nodes = [helper.make_node("Gemm", ["x", "W"], ["h0"])]
    for k in range(1, n_nodes):
        nodes.append(helper.make_node("Relu", [f"h{k - 1}"], [f"h{k}"]))
    return _model(nodes, [w], f"h{n_nodes - 1}", width)


def residual_chain(n_adds: int, width: int = 4) -> onnx.ModelProto:
    """h <- h + 0.5 relu(h), n_adds times (3 nodes per block)."""
    half = numpy_helper.from_array(np.full(width, 0.5, dtype=np.float32), "half")
    nodes, prev = [], "x"
    for k in range(n_adds):
        nodes += [helper.make_node("Relu", [prev], [f"r{k}"]),
                  helper.make_node("Mul", [f"r{k}", "half"], [f"m{k}"]),
                  helper.make_node("Add", [prev, f"m{k}"], [f"a{k}"])]
        prev = f"a{k}"
    return _model(nodes, [half], prev, width)


def _model(nodes, inits, out: str, width: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, width])], [helper.make_tensor_value_info(
            out, TensorProto.FLOAT, [1, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def time_import(model: onnx.ModelProto, folder: Path, verify: bool) -> dict:
    from lipcert.ir.passes import canonicalize
    from lipcert.onnx_import import load
    from lipcert.onnx_import.builder import build_graph
    from lipcert.onnx_import.load import read_model

    path = folder / "m.onnx"
    onnx.save(model, path)
    t0 = time.perf_counter()
    proto = read_model(path)
    t1 = time.perf_counter()
    raw = build_graph(proto)
    t2 = time.perf_counter()
    canonicalize(raw)
    t3 = time.perf_counter()
    graph = load(path, verify=verify)
    t4 = time.perf_counter()
    return {"nodes": len(model.graph.node), "ir_nodes": len(graph), "read": t1 - t0,
            "build": t2 - t1, "passes": t3 - t2, "load": t4 - t3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{'graph':>18} {'ONNX nodes':>10} {'IR nodes':>9} {'read s':>7} {'build s':>8} "
          f"{'passes s':>9} {'load() s':>9} {'load s/1k nodes':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, make in (("relu chain", relu_chain),
                           ("residual Add chain", lambda n: residual_chain(n // 3))):
            for n in sizes:
                row = time_import(make(n), Path(tmp), verify=not args.no_verify)
                print(f"{kind:>18} {row['nodes']:>10,} {row['ir_nodes']:>9,} {row['read']:>7.2f} "
                      f"{row['build']:>8.2f} {row['passes']:>9.2f} {row['load']:>9.2f} "
                      f"{1000 * row['load'] / row['nodes']:>16.3f}", flush=True)


if __name__ == "__main__":
    main()
