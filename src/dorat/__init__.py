"""dorat: DOubly Robust Adversarial Training.

Instance-reweighted adversarial training (DONE and baselines) and an evaluator that reports
average *and* worst-class robustness. See README.md and the documentation site (docs/, `make docs`).

    import dorat
    fitted = dorat.fit(my_model, (x_train, y_train), (x_test, y_test), method="done", epochs=5)
    metrics, _ = dorat.evaluate(fitted.model, x_test, y_test, classes, ["pgd", "cw"])
    card = dorat.benchmark(any_model, "cifar10", eps=8/255, n=1000)  # a RobustBench-like card

A new part is a dataclass registered by name (``@dorat.register("weighting", "mine")``); see
examples/ for a plug-in in one file.
"""

from typing import Any

from dorat.errors import CheckpointError, ConfigError, DataError, DoratError
from dorat.parts import opt, register

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "DoratError", "Weighting", "__version__",
           "benchmark", "evaluate", "fit", "opt", "register", "register_preset"]


def __getattr__(name: str) -> Any:  # the heavier parts load on first use
    if name == "fit":
        from dorat.api import fit
        return fit
    if name == "benchmark":
        from dorat.card import benchmark
        return benchmark
    if name == "evaluate":
        from dorat.evaluate import evaluate
        return evaluate
    if name == "register_preset":
        from dorat.config import register_preset
        return register_preset
    if name == "Weighting":
        from dorat.objectives.base import Weighting
        return Weighting
    raise AttributeError(f"module 'dorat' has no attribute '{name}'")
