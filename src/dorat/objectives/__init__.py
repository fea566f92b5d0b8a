"""Per-example losses, weightings, training attacks and the method they compose.

Importing this package registers the built-in parts (dorat.config.parts).

Imports: evaluation (the probe's class measurements that class-level weightings read),
models, data, config, attacks, files, system, errors; never training or runs
(tests/test_layers.py).
"""

from dorat.objectives import attacks, faal, fairness, losses, weightings  # noqa: F401  register the parts
from dorat.objectives.base import LossOutput, StepContext, Weighting
from dorat.objectives.done import KLDROWeighting
from dorat.objectives.method import Method, StepOutput, build_method

__all__ = ["KLDROWeighting", "LossOutput", "Method", "StepContext", "StepOutput", "Weighting",
           "build_method"]
