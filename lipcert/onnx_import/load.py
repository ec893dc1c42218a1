"""Reading an ONNX file safely: clear errors for missing, empty, truncated or foreign files,
and external tensor data only from the model's own folder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import external_data_helper

from ..errors import InputError, positive_int_env

MAX_BYTES_ENV = "LIPCERT_MAX_MODEL_BYTES"
DEFAULT_MAX_BYTES = 2 * 1024**3  # protobuf's own limit for one message


def max_model_bytes() -> int:
    """The largest model file lipcert reads (LIPCERT_MAX_MODEL_BYTES raises it)."""
    return positive_int_env(MAX_BYTES_ENV, DEFAULT_MAX_BYTES, "bytes")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _external_tensors(model: onnx.ModelProto):
    yield from external_data_helper._get_all_tensors(model)


def read_model(path: str | Path) -> onnx.ModelProto:
    """Parse ``path`` into a ModelProto or raise :class:`InputError` with one clear line."""
    data = _read_bounded(path)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise InputError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}); "
            "is the file truncated or of another format?"
        ) from None
    if not model.graph.node:
        raise InputError(f"{path}: the model's graph is empty (no nodes); is this an ONNX model?")
    _load_external_data(path, model)
    return model


def _read_bounded(path: str | Path) -> bytes:
    """The bytes of a regular file of at most ``max_model_bytes()``: a pipe, a device or a
    directory is refused before any read, and the read itself is bounded."""
    p = Path(path)
    try:
        exists, is_dir, is_file = p.exists(), p.is_dir(), p.is_file()
    except OSError as exc:  # e.g. a name too long
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not exists:
        raise InputError(f"{path}: no such file")
    if is_dir:
        raise InputError(f"{path}: is a directory; give the path of an .onnx file")
    if not is_file:  # a named pipe would block, a device never ends
        raise InputError(f"{path}: not a regular file (a pipe, socket or device); give the "
                         "path of an .onnx file")
    limit = max_model_bytes()
    size = p.stat().st_size
    if size > limit:
        raise InputError(f"{path}: {size:,} bytes, above the limit of {limit:,}; set "
                         f"{MAX_BYTES_ENV}=N to read larger models")
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:  # a file that grew, or one whose size the system misreports
        raise InputError(f"{path}: more than {limit:,} bytes; set {MAX_BYTES_ENV}=N to read "
                         "larger models")
    if not data:
        raise InputError(f"{path}: the file is empty")
    return data


def _load_external_data(path: str | Path, model: onnx.ModelProto) -> None:
    """External tensor data, read only from the model's own folder."""
    folder = Path(path).resolve().parent
    has_external = False
    for tensor in _external_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        has_external = True
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (folder / location).resolve()
        if Path(location).is_absolute() or folder not in target.parents:
            raise InputError(
                f"{path}: tensor {tensor.name!r} keeps its data at {location!r}, outside the "
                "model's folder; lipcert reads external data only from beside the model"
            )
        if not target.is_file():
            raise InputError(
                f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, which is missing"
            )
    if has_external:
        try:
            external_data_helper.load_external_data_for_model(model, str(folder))
        except Exception as exc:
            raise InputError(f"{path}: cannot read external tensor data: {exc}") from None
