"""Guards that make a wrong number hard to print.

Every method passes the values a printed bound is built from through :func:`checked`
(or :func:`checked_array`): a NaN, or a negative value where only nonnegative ones make sense,
raises :class:`~lipcert.errors.InternalCheckFailed`, and the method ends with no bound.
Comparisons are written so that NaN fails them (``not value >= 0``, never ``value < 0``).

:func:`inject_nan` is a test hook: inside it, :func:`poison` writes a NaN into the values of
the named sites, so tests can show that a NaN anywhere on a method's path yields no bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from .errors import InternalCheckFailed

#: The sites where :func:`poison` can inject a NaN (tests iterate over them).
SITES = (
    "naive.factor",        # one layer's norm in the product of layer norms
    "gram.layer",          # one conv layer's Gram-iteration value
    "lipsdp.rho",          # the certified rho of one (sub-)chain
    "local.relaxation",    # one activation's linear relaxation on its interval
    "local.jacobian",      # the gradient-interval bounds of the adjoint recursion
    "exact.value",         # one output's MIP value
    "lower.value",         # the sampled lower bound
    "certify.logits",      # the float64 logits of the data
    "certify.pair_bound",  # a logit-difference bound used for radii
)

_ACTIVE: set[str] = set()


@contextmanager
def inject_nan(*sites: str) -> Iterator[None]:
    """Test hook: inside this block, :func:`poison` puts a NaN into each named site."""
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown injection sites {sorted(unknown)}; known: {SITES}")
    before = set(_ACTIVE)
    _ACTIVE.update(sites)
    try:
        yield
    finally:
        _ACTIVE.clear()
        _ACTIVE.update(before)


def injections() -> frozenset[str]:
    """The sites :func:`inject_nan` poisons now (part of the key of every cache of
    computed bounds, so that a poisoned run never reuses a clean one's values)."""
    return frozenset(_ACTIVE)


def poison(site: str, value: Any) -> Any:
    """``value`` unchanged, or with a NaN written into it while :func:`inject_nan` names
    ``site`` (floats, numpy arrays and torch tensors)."""
    if site not in _ACTIVE:
        return value
    if isinstance(value, float | int | np.floating):
        return math.nan
    if isinstance(value, np.ndarray):
        value = value.astype(np.float64, copy=True)
        value.reshape(-1)[0] = np.nan
        return value
    try:
        import torch
    except ImportError:  # pragma: no cover
        return value
    if isinstance(value, torch.Tensor):
        value = value.clone()
        value.reshape(-1)[0] = float("nan")
        return value
    return value


def checked(value: float, what: str, *, allow_inf: bool = True) -> float:
    """``value`` if it is a number >= 0 (NaN fails), else InternalCheckFailed naming ``what``."""
    value = float(value)
    if not value >= 0.0 or (not allow_inf and not math.isfinite(value)):
        raise InternalCheckFailed(f"internal check failed: {what} is {value!r} (expected a "
                                  "number >= 0); no bound printed. Please report this model")
    return value


def checked_array(values: Any, what: str, *, nonnegative: bool = False) -> Any:
    """``values`` (numpy array or torch tensor) if it holds no NaN (and, with
    ``nonnegative``, no value below 0); else InternalCheckFailed naming ``what``."""
    if isinstance(values, np.ndarray):
        bad = np.isnan(values).any() or (nonnegative and not np.all(values >= 0))
    else:
        bad = bool(values.isnan().any()) or (nonnegative and not bool((values >= 0).all()))
    if bad:
        raise InternalCheckFailed(f"internal check failed: {what} contains NaN"
                                  + (" or negative values" if nonnegative else "")
                                  + "; no bound printed. Please report this model")
    return values
