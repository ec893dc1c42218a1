"""The ``gram`` method: Gram-iteration bounds for convolutions (estimator.py) on top of the
rigorous Gram iteration itself (core.py). Importing the package registers the estimator."""

from .estimator import GramEstimator, GramSettings

__all__ = ["GramEstimator", "GramSettings"]
