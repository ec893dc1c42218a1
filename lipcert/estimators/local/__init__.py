"""The ``local`` method: linear relaxations of activations (relaxations.py), bound propagation
through the network and its Clarke Jacobian (jacobian.py), branch-and-bound on the gradient
bound (bab.py), lower bounds of output functionals for certification (margin.py) and the
estimator (estimator.py). Importing the package registers the estimator."""

from .estimator import LocalEstimator, LocalSettings, gradient_norms, local_bound
from .margin import MarginResult, margin_bounds

__all__ = ["LocalEstimator", "LocalSettings", "MarginResult", "gradient_norms", "local_bound",
           "margin_bounds"]
