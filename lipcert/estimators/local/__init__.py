"""The ``local`` method: linear relaxations of activations (relaxations.py), bound propagation
through the network and its Clarke Jacobian (jacobian.py), branch-and-bound (bab.py) and the
estimator (estimator.py). Importing the package registers the estimator."""

from .estimator import LocalEstimator, LocalSettings, gradient_norms, local_bound

__all__ = ["LocalEstimator", "LocalSettings", "gradient_norms", "local_bound"]
