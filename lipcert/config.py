"""TOML configuration: per-method settings, compare defaults and certification gates.

    [compare]            methods, norm, timeout
    [certify]            model, data, labels, eps, norm, method, min_certified_accuracy,
                         workers, checkpoint, ray, ...
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
MAX_CONFIG_BYTES = 1 << 20


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_number(e) for e in v)


def _methods_value(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(e, str) for e in v))


# key -> (check, what a user should write)
_STR = (lambda v: isinstance(v, str), "a string")
_NUM = (_is_number, "a number")
_NORM = (lambda v: isinstance(v, str) or _is_number(v), '2 or "inf"')
CERTIFY_KEYS: dict[str, tuple] = {
    "model": _STR, "data": _STR, "labels": _STR, "eps": _NUM, "norm": _NORM,
    "method": _STR, "min_certified_accuracy": _NUM, "device": _STR,
    "report_eps": (_number_list, "a list of numbers, e.g. [0.05, 0.1]"),
    "options": (lambda v: isinstance(v, dict), "a table, e.g. { iterations = 12 }"),
    "workers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
                "a whole number >= 1"),
    "checkpoint": _STR, "ray": _STR,
    "pair_bounds": (lambda v: v in ("each", "global"), '"each" or "global"'),
    "shells": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
               "a whole number >= 1"),
    "margin_bounds": (lambda v: isinstance(v, bool), "true or false"),
}
COMPARE_KEYS: dict[str, tuple] = {
    "methods": (_methods_value, 'a list of method names, e.g. ["naive", "gram"]'),
    "norm": _NORM, "timeout": _NUM,
}


def _read_text(path: str) -> str:
    cfg_path = Path(path)
    try:
        if not cfg_path.exists():
            raise InputError(f"{path}: no such config file")
        if not cfg_path.is_file():
            raise InputError(f"{path}: not a regular file; give the path of a TOML file")
        if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
            raise InputError(f"{path}: larger than {MAX_CONFIG_BYTES:,} bytes; is this a TOML "
                             "config file?")
        raw = cfg_path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file (TOML is UTF-8 text)") from None


def _check_types(path: str, section: str, table: dict, schema: dict) -> None:
    extra = set(table) - set(schema)
    if extra:
        raise InputError(f"{path}: unknown keys {sorted(extra)} in [{section}]; known: "
                         f"{sorted(schema)}")
    for key, value in table.items():
        check, what = schema[key]
        if not check(value):
            raise InputError(f"{path}: [{section}] {key} = {value!r}: expected {what}")


def read_config(path: str | None) -> dict[str, Any]:
    """The TOML file at ``path`` (None: empty), with every section and key type checked."""
    if path is None:
        return {}
    try:
        data = tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: invalid TOML: {exc}") from None
    unknown = set(data) - SECTIONS
    if unknown:
        raise InputError(f"{path}: unknown sections {sorted(unknown)}; known: {sorted(SECTIONS)}")
    for section in SECTIONS & set(data):
        if not isinstance(data[section], dict):
            raise InputError(f"{path}: {section} must be a table ([{section}]), got "
                             f"{data[section]!r}")
    for section, schema in (("certify", CERTIFY_KEYS), ("compare", COMPARE_KEYS)):
        _check_types(path, section, data.get(section, {}), schema)
    for name, table in data.get("methods", {}).items():
        if not isinstance(table, dict):
            raise InputError(f"{path}: [methods.{name}] must be a table of settings, got "
                             f"{table!r}")
    compare = data.get("compare", {})
    if isinstance(compare.get("methods"), str):  # "naive,gram" as on the command line
        compare["methods"] = [m.strip() for m in compare["methods"].split(",") if m.strip()]
    certify = data.get("certify", {})
    for key in ("model", "data", "labels", "checkpoint"):
        if key in certify and not Path(certify[key]).is_absolute():
            certify[key] = str(Path(path).parent / certify[key])
    return data


def method_options(cfg: dict[str, Any], method: str) -> dict[str, Any]:
    return dict(cfg.get("methods", {}).get(method, {}))


def load_point(path: str, index: int | None = None) -> np.ndarray:
    """One input point from .npy, or sample ``index`` of an .npz's ``x``/.npy batch (an
    .npz of several samples needs ``index``: no sample is picked silently)."""
    if Path(path).suffix == ".npz":
        (arr,) = read_arrays(path, ("x",), "input")
        if index is None:
            if np.ndim(arr) == 0 or len(arr) != 1:
                raise InputError(f"--input {path}: its x holds {len(np.atleast_1d(arr))} "
                                 "samples; pick one with --index K")
            index = 0
    else:
        (arr,) = read_arrays(path, (), "input")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) \
            or arr.dtype == np.bool_:
        raise InputError(f"--input {path}: dtype {arr.dtype}; give real numbers (float)")
    arr = np.asarray(arr, dtype=np.float64)
    if index is None:
        return arr
    if arr.ndim == 0 or not -len(arr) <= index < len(arr):
        size = 0 if arr.ndim == 0 else len(arr)
        raise InputError(f"--index {index}: {path} holds {size} samples (0 to {size - 1})")
    return arr[index]
