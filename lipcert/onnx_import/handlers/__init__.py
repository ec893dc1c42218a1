"""Importing this package registers every ONNX op handler."""

from . import activations, conv, elementwise, linear, pool, shape  # noqa: F401
