"""Import fidelity: the IR's float64 forward must reproduce onnxruntime on random inputs.

Bounds are computed for the IR; this check is what makes them bounds for the model as
exported (docs/ARCHITECTURE.md, "Soundness").
"""

from __future__ import annotations

import numpy as np
import onnx
import torch

from ..errors import ModelRefused
from ..ir import evaluate
from ..ir.graph import Graph

_NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
}


def ort_session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    ort.set_default_logger_severity(4)  # errors come back as exceptions, said in one line
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    try:
        return ort.InferenceSession(model.SerializeToString(), options,
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelRefused(f"onnxruntime refuses to load the model, so lipcert cannot check "
                           f"what it bounds: {_first_line(exc)}") from None


def input_dtype(model: onnx.ModelProto):
    """numpy dtype of the model's (single, non-initializer) input; float types only."""
    initializers = {t.name for t in model.graph.initializer}
    spec = next(i for i in model.graph.input if i.name not in initializers)
    elem = spec.type.tensor_type.elem_type
    if elem not in _NP_TYPES:
        raise ModelRefused(f"input {spec.name!r} has element type "
                           f"{onnx.TensorProto.DataType.Name(elem)}; lipcert bounds float models")
    return _NP_TYPES[elem]


def sample_inputs(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """Inputs of several scales: standard normal, [0, 1] uniform (images), large, and small
    (so that some sample stays in range for models that overflow on large inputs)."""
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(shape) if k % 4 == 0 else
          rng.uniform(0.0, 1.0, shape) if k % 4 == 1 else
          10.0 * rng.standard_normal(shape) if k % 4 == 2 else
          0.01 * rng.standard_normal(shape) for k in range(n)]
    return np.stack(xs)


def check_fidelity(model: onnx.ModelProto, graph: Graph, n_samples: int = 8,
                   rtol: float = 1e-3, seed: int = 0) -> dict:
    """Compare onnxruntime with the IR forward; raises ModelRefused on disagreement.

    The tolerance is relative to the output scale and to the float32 rounding noise of the
    IR itself (float32 forward minus float64 forward), since ORT computes in float32. The two
    must agree on which outputs are finite (a float32 overflow of onnxruntime is matched by
    the IR's own float32 forward), and at least one sample must give finite outputs in both:
    a check that compared nothing proves nothing.
    """
    session = ort_session(model)
    spec = session.get_inputs()[0]
    np_type = input_dtype(model)
    worst, compared = 0.0, 0
    xs = sample_inputs(graph.input_shape, n_samples, seed).astype(np_type)
    xt = torch.as_tensor(xs.astype(np.float64))
    all64, all32 = _forward(graph, xt), _forward(graph, xt.float())
    for x, ir64, ir32 in zip(xs, all64, all32, strict=True):
        try:
            ort_out = session.run(None, {spec.name: x})[0]
        except Exception as exc:
            raise ModelRefused(f"onnxruntime fails to run the model: {_first_line(exc)}") \
                from None
        ort_out = np.asarray(ort_out, dtype=np.float64)
        if ort_out.size != ir64.size:
            raise ModelRefused(f"lipcert's import disagrees with onnxruntime on the output size "
                               f"({ir64.shape} vs {ort_out.shape})")
        ort_out = ort_out.reshape(ir64.shape)
        ort_finite, ir_finite = np.isfinite(ort_out), np.isfinite(ir64)
        if np.any(ort_finite != np.isfinite(ir32)) or np.any(ort_finite & ~ir_finite):
            raise ModelRefused(
                "lipcert's import disagrees with onnxruntime on which outputs are finite "
                f"({int(ort_finite.sum())} of {ort_finite.size} finite in onnxruntime, "
                f"{int(ir_finite.sum())} in lipcert's float64 reading); refusing to bound a "
                "model it may misread. Please report this model")
        if not (ort_finite.all() and ir_finite.all()):
            continue  # overflow on a large random input, in both: not informative
        scale = max(1.0, float(np.max(np.abs(ir64))))
        noise = float(np.max(np.abs(ir32 - ir64)))
        err = float(np.max(np.abs(ort_out - ir64)))
        if not err <= rtol * scale + 20.0 * noise:
            raise ModelRefused(
                f"lipcert's import disagrees with onnxruntime (max abs difference {err:.3g} at "
                f"output scale {scale:.3g}); refusing to bound a model it may misread. "
                "Please report this model; --no-verify skips the check at your own risk")
        worst = max(worst, err / scale)
        compared += 1
    if compared == 0:
        raise ModelRefused(
            f"no random input gave finite outputs (in onnxruntime and in lipcert's reading) on "
            f"{n_samples} samples, so the import could not be checked; a model whose outputs "
            "are NaN or infinite has no Lipschitz bound")
    return {"samples": n_samples, "compared": compared, "max_rel_error": worst}


def _forward(graph: Graph, xs: torch.Tensor) -> np.ndarray:
    """The IR forward on a batch of samples, in the samples' dtype, as float64 numpy: one
    batched pass (vmap) where every op allows it, else sample by sample."""
    with torch.no_grad():
        try:
            out = evaluate.run_batch(graph, xs)
        except Exception:
            out = torch.stack([evaluate.run(graph, x) for x in xs])
    return out.double().numpy()


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[0].split()) if text else type(exc).__name__
