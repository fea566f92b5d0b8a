"""Per-example losses, weightings and method presets (attack × loss × weighting)."""

from dorat.objectives.base import LossOutput, StepContext, Weighting
from dorat.objectives.methods import PRESETS, Method, build_method, check_method, method_names

__all__ = ["LossOutput", "StepContext", "Weighting", "Method", "PRESETS", "build_method", "check_method",
           "method_names"]
