"""dorat: DOubly Robust Adversarial Training.

Instance-reweighted adversarial training (DONE and baselines) and an evaluator that reports
average *and* worst-class robustness. See README.md, shared METHODS.md for the math.
"""

from dorat.errors import CheckpointError, ConfigError, DataError, DoratError

__version__ = "0.1.0"

__all__ = ["DoratError", "DataError", "ConfigError", "CheckpointError", "__version__"]
