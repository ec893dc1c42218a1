"""Typed, validated method settings: one frozen dataclass per estimator, the one source of
truth for names, types, defaults and bounds.

``-o KEY=VALUE``, a TOML ``[methods.NAME]`` table and the Python API's keyword arguments all
go through :func:`parse_settings`: an unknown key or a bad value is an InputError (exit 2)
naming the key and listing the valid ones, never silently ignored. ``lipcert methods`` and
``configs/default.toml`` are checked against these dataclasses (tests/test_settings.py).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from ..errors import InputError

#: keys that describe the run, not the method: accepted by every method
CONTEXT_KEYS = frozenset({"center", "eps", "domain", "queries", "targets", "progress",
                          "device"})


def setting(default: Any, help: str, *, minimum: float | None = None,
            exclusive: bool = False, choices: tuple[str, ...] | None = None,
            infinite: bool = False) -> Any:
    """A dataclass field with its help text and the range its value must lie in;
    ``infinite``: +inf is a valid value (a time limit that never stops the method)."""
    return field(default=default, metadata={"help": help, "minimum": minimum,
                                            "exclusive": exclusive, "choices": choices,
                                            "infinite": infinite})


@dataclass(frozen=True)
class NoSettings:
    """A method without settings."""


def _as_bool(method: str, name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise InputError(f"method {method}: setting {name}={value!r} must be true or false")


def _as_int(method: str, name: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    raise InputError(f"method {method}: setting {name}={value!r} must be an integer")


def _as_float(method: str, name: str, value: Any, infinite: bool = False) -> float:
    if isinstance(value, bool):
        raise InputError(f"method {method}: setting {name}={value!r} must be a number")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise InputError(f"method {method}: setting {name}={value!r} must be a number") from None
    if not (math.isfinite(result) or (infinite and result == math.inf)):
        raise InputError(f"method {method}: setting {name}={value!r} must be finite")
    return result


def _as_str(method: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InputError(f"method {method}: setting {name}={value!r} must be a string")
    return value.lower()


_COERCE = {"int": _as_int, "float": _as_float, "str": _as_str, "bool": _as_bool}


def parse_settings(method: str, cls: type, options: dict[str, Any]) -> Any:
    """Validate the method keys of ``options`` into an instance of ``cls``."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(options) - set(known) - CONTEXT_KEYS)
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise InputError(f"method {method} has no setting {', '.join(map(repr, unknown))}; "
                         f"its settings: {valid}")
    values = {}
    for name, f in known.items():
        if name not in options or options[name] is None:
            continue
        kind = str(f.type).split(" | ")[0]
        value = _as_float(method, name, options[name], bool(f.metadata.get("infinite"))) \
            if kind == "float" else _COERCE[kind](method, name, options[name])
        meta = f.metadata
        if meta.get("choices") and value not in meta["choices"]:
            raise InputError(f"method {method}: setting {name}={value!r} is not one of "
                             f"{', '.join(meta['choices'])}")
        low = meta.get("minimum")
        if low is not None and (value < low or (meta.get("exclusive") and value == low)):
            op = ">" if meta.get("exclusive") else ">="
            raise InputError(f"method {method}: setting {name}={value!r} must be {op} {low:g}")
        values[name] = value
    return cls(**values)


def merged_options(settings: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The run's context keys plus every setting, validated and with its default."""
    context = {k: v for k, v in options.items() if k in CONTEXT_KEYS}
    return {**context, **{k: v for k, v in asdict(settings).items() if v is not None}}


def describe(cls: type) -> list[dict[str, Any]]:
    """Name, type, default and help of every setting (``lipcert methods``, docs, tests)."""
    rows = []
    for f in fields(cls):
        default = None if f.default is MISSING else f.default
        rows.append({"name": f.name, "type": str(f.type).split(" | ")[0], "default": default,
                     "help": f.metadata.get("help", ""), "choices": f.metadata.get("choices")})
    return rows
