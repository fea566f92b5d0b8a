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

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Any

from dorat.config.parts import opt, register
from dorat.errors import CheckpointError, ConfigError, DataError, DoratError

__version__ = "0.1.0"

# Old module paths (before the subpackages, 0.1 and earlier) -> where the module lives now.
MOVED = {"parts": "config.parts", "presets": "config.presets", "sections": "config.sections",
         "yamlfile": "config.yamlfile", "checkpoint": "files.checkpoint", "locks": "files.locks",
         "runtime": "system.runtime", "distributed": "system.distributed",
         "averaging": "models.averaging", "evaluate": "evaluation.evaluate",
         "checks": "evaluation.checks", "card": "evaluation.card", "probe": "evaluation.probe",
         "trainer": "training.trainer", "stats": "training.stats", "midepoch": "training.midepoch",
         "interrupts": "training.interrupts", "guard": "training.guard", "advice": "training.advice",
         "tracking": "training.tracking", "run": "runs.run", "rundir": "runs.rundir",
         "warmstart": "runs.warmstart", "evalcmd": "cli.eval_command", "report.grid": "compare.report"}


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import dorat.run`` (an old path) gives the module at its new path, the same object, with
    a DeprecationWarning that names the new path."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        old = fullname.removeprefix("dorat.")
        if fullname.startswith("dorat.") and old in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: Any) -> Any:
        new = "dorat." + MOVED[spec.name.removeprefix("dorat.")]
        warnings.warn(f"{spec.name} is now {new}", DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: Any) -> None:  # the module at its new path is already executed
        pass


sys.meta_path.append(_OldPath())

__all__ = ["CheckpointError", "ConfigError", "DataError", "DoratError", "Weighting", "__version__",
           "benchmark", "evaluate", "fit", "opt", "register", "register_preset"]


def __getattr__(name: str) -> Any:  # the heavier parts load on first use
    if name == "fit":
        from dorat.api import fit
        return fit
    if name == "benchmark":
        from dorat.evaluation.card import benchmark
        return benchmark
    if name == "evaluate":
        from dorat.evaluation.evaluate import evaluate
        return evaluate
    if name == "register_preset":
        from dorat.config import register_preset
        return register_preset
    if name == "Weighting":
        from dorat.objectives.base import Weighting
        return Weighting
    raise AttributeError(f"module 'dorat' has no attribute '{name}'")
