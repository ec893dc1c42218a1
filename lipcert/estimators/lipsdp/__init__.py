"""The ``lipsdp`` method: the LMI and its multiplier structure (lmi.py), the float-rigorous
certificate check (certificate.py), and the estimator with its proposers and sub-chains
(estimator.py). Importing the package registers the estimator."""

from .estimator import LipSDPEstimator, LipSDPSettings

__all__ = ["LipSDPEstimator", "LipSDPSettings"]
