"""Bounding methods. Importing a module registers its estimator."""

from __future__ import annotations

from .base import REGISTRY, Bound, Estimator, get_estimator, parse_norm, run_estimator

__all__ = ["REGISTRY", "Bound", "Estimator", "get_estimator", "parse_norm", "run_estimator",
           "load_all"]


def load_all() -> None:
    from . import exact, gram, lipsdp, local, lower, naive  # noqa: F401
