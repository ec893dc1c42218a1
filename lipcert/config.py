"""TOML configuration: per-method settings, compare defaults and certification gates.

    [compare]            methods, norm, timeout
    [certify]            model, data, labels, eps, norm, method, min_certified_accuracy, ...
    [methods.<name>]     settings passed to that method (see configs/default.toml)
Relative paths in [certify] are relative to the file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from .data import read_arrays
from .errors import InputError

SECTIONS = {"compare", "certify", "methods"}
CERTIFY_KEYS = {"model", "data", "labels", "eps", "norm", "method", "min_certified_accuracy",
                "report_eps", "options", "device"}
COMPARE_KEYS = {"methods", "norm", "timeout"}


def read_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    cfg_path = Path(path)
    try:
        data = tomllib.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML: {exc}") from None
    unknown = set(data) - SECTIONS
    if unknown:
        raise InputError(f"{path}: unknown sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    for section, keys in (("certify", CERTIFY_KEYS), ("compare", COMPARE_KEYS)):
        extra = set(data.get(section, {})) - keys
        if extra:
            raise InputError(f"{path}: unknown keys {sorted(extra)} in [{section}]; known: "
                             f"{sorted(keys)}")
    certify = data.get("certify", {})
    for key in ("model", "data", "labels"):
        if key in certify and not Path(certify[key]).is_absolute():
            certify[key] = str(cfg_path.parent / certify[key])
    return data


def method_options(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    return dict(cfg.get("methods", {}).get(method, {}))


def load_point(path: str, index: int | None = None) -> np.ndarray:
    """One input point from .npy, or sample ``index`` of an .npz's ``x``/.npy batch."""
    if Path(path).suffix == ".npz":
        (x,) = read_arrays(path, ("x",), "input")
        return np.asarray(x[index or 0], dtype=np.float64)
    (arr,) = read_arrays(path, (), "input")
    arr = np.asarray(arr, dtype=np.float64)
    return arr[index] if index is not None else arr
