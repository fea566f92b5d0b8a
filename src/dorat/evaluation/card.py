"""Evaluate any model, not only dorat's runs: ``dorat eval --model`` and ``dorat.benchmark``.

A user's ``nn.Module`` comes from an importable factory (``my_pkg.nets:make_model``), its weights
from a safetensors file or a PyTorch state dict read with ``torch.load(weights_only=True)``
(nothing is unpickled that could run code). The model takes images in [0, 1]; one trained on
normalised inputs is wrapped by ``Normalized``. It is evaluated by the same evaluator and sanity
checks as a dorat run, and the result is a *card*: the evaluation's metrics (the eval.json format,
so `dorat report` reads it beside run directories) plus RobustBench-like fields (dataset, threat
model, eps, clean and AutoAttack accuracy in %) and the versions that produced it.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dorat.errors import ConfigError, DoratError
from dorat.files.checkpoint import STATE_KEYS, load_external_weights, read_torch_state, sha256  # noqa: F401
from dorat.models import build_external, import_factory  # noqa: F401  (their old home)

CARD_FORMAT = "dorat-card/1"
# RobustBench's standard threat models (robustbench.model_zoo: Linf 8/255 and L2 0.5 on CIFAR)
STANDARD_EPS = {("cifar10", "linf"): 8 / 255, ("cifar100", "linf"): 8 / 255,
                ("cifar10", "l2"): 0.5, ("cifar100", "l2"): 0.5}
THREAT_MODEL = {"linf": "Linf", "l2": "L2"}


class Normalized(nn.Module):
    """``model((x − mean) / std)``: for a model trained on normalised inputs, so that the attacks
    work in the [0, 1] pixel space where ε is defined."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def parse_normalize(text: str, channels: int) -> tuple[list[float], list[float]]:
    """``m,s`` (every channel) or ``m1,..,mC,s1,..,sC`` → (mean, std) of ``channels`` values."""
    try:
        v = [float(t) for t in text.split(",")]
    except ValueError:
        v = []
    if len(v) not in (2, 2 * channels):
        raise ConfigError(f"--normalize '{text}' must be MEAN,STD or {channels} means then {channels} "
                          f"stds, comma-separated (e.g. 0.4914,0.4822,0.4465,0.2471,0.2435,0.2616)")
    return per_channel((v[:len(v) // 2], v[len(v) // 2:]), channels)


def per_channel(normalize: tuple[Any, Any], channels: int) -> tuple[list[float], list[float]]:
    """(mean, std), each a number or one value per channel, as two lists of ``channels`` values."""
    out = []
    for what, v in zip(("mean", "std"), normalize):
        vals = [float(v)] if isinstance(v, (int, float)) else [float(t) for t in v]
        if len(vals) not in (1, channels) or not all(math.isfinite(t) for t in vals):
            raise ConfigError(f"normalize: the {what} must be one finite number or {channels} (one per "
                              f"channel), got {v}")
        out.append(vals * (channels // len(vals)))
    if min(out[1]) <= 0:
        raise ConfigError(f"normalize: every std must be > 0, got {normalize[1]}")
    return out[0], out[1]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("dorat", "pyautoattack", "autoattack"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


def default_eps(dataset: str, norm: str) -> float:
    if (dataset, norm) in STANDARD_EPS:
        return STANDARD_EPS[(dataset, norm)]
    raise ConfigError(f"no standard eps for {dataset} ({norm}): give it with --eps (the threat "
                      "radius on images in [0, 1])")


def benchmark(model: nn.Module, dataset: str, eps: float | None = None, n: int | None = 1000,
              attacks: Sequence[str] = ("pgd", "cw", "aa"), *, norm: str = "linf", steps: int = 20,
              restarts: int = 1, checks: bool = True, check_n: int = 200,
              data_dir: str | None = None, device: str = "auto",
              normalize: str | tuple[Sequence[float], Sequence[float]] | None = None,
              model_info: Mapping[str, Any] | None = None, progress: bool = False,
              log: Callable[[str], None] | None = None, journal: Path | None = None
              ) -> dict[str, Any]:
    """Evaluate ``model`` (inputs in [0, 1]) on ``n`` stratified test points of ``dataset`` under
    ``attacks`` and return its card (see the module docstring). ``normalize``: (mean, std), or
    its text "MEAN,STD" / C means then C stds, wraps a model that expects normalised inputs.
    ``eps`` defaults to RobustBench's standard radius where there is one (CIFAR-10/100: 8/255
    Linf, 0.5 L2). ``journal``: a file the evaluation saves its progress in and resumes from
    (dorat.evaluation.evaluate)."""
    from dorat.data import check_dataset, load_dataset
    from dorat.evaluation.evaluate import EvalSettings, check_attacks, evaluate
    from dorat.system.runtime import resolve_device

    if norm not in THREAT_MODEL:
        raise ConfigError(f"norm '{norm}' is not one of {', '.join(THREAT_MODEL)}")
    check_attacks(attacks)
    eps = default_eps(dataset, norm) if eps is None else float(eps)
    if not (math.isfinite(eps) and eps > 0):
        raise ConfigError(f"eps must be a positive number, got {eps}")
    if n is not None and n < 1:
        raise ConfigError(f"n must be at least 1 (or None for the whole test set), got {n}")
    dev = resolve_device(device)
    ds = load_dataset(dataset, data_dir)
    check_dataset(ds)
    if normalize is not None:
        channels = int(ds.x_test.shape[1])
        normalize = parse_normalize(normalize, channels) if isinstance(normalize, str) else \
            per_channel(normalize, channels)
        model = Normalized(model, *normalize)
    model = model.to(dev).eval()
    settings = EvalSettings(eps=eps, norm=norm, steps=steps, restarts=restarts)
    metrics, _ = evaluate(model, ds.x_test, ds.y_test, ds.classes, list(attacks), settings, n, dev,
                          progress, checks=checks, check_n=check_n, journal=journal, log=log)
    return make_card(metrics, dataset, norm, eps, attacks, model_info, normalize)


def make_card(metrics: dict[str, Any], dataset: str, norm: str, eps: float, attacks: Sequence[str],
              model_info: Mapping[str, Any] | None,
              normalize: tuple[Sequence[float], Sequence[float]] | None) -> dict[str, Any]:
    """The evaluation's metrics plus the RobustBench-like header fields."""
    pct = lambda v: round(100 * v, 2)  # noqa: E731  (RobustBench reports accuracies in %)
    card = {
        "format": CARD_FORMAT, "dataset": dataset, "threat_model": THREAT_MODEL[norm], "eps": eps,
        "n": metrics["n"], "split": "test", "clean_acc": pct(metrics["sa"]),
        "robust_acc": {k: pct(v) for k, v in metrics["ra"].items()},
        **({"autoattack_acc": pct(metrics["ra"]["aa"])} if "aa" in attacks else {}),
        "worst_class_acc": {k: pct(v) for k, v in metrics["worst_class"].items() if k != "clean"},
        "tail30_acc": {k: pct(v) for k, v in metrics["tail30"].items() if k != "clean"},
        "model": {**dict(model_info or {}),
                  "normalize": {"mean": list(normalize[0]), "std": list(normalize[1])}
                  if normalize is not None else None},
        "versions": versions(),
    }
    return {**card, **metrics, "method": "external"}


def is_card(path: Path) -> bool:
    """A JSON file (not a directory) that `dorat report` should read as a card."""
    return path.is_file() and path.suffix == ".json"


def read_card(path: Path) -> dict[str, Any]:
    from dorat.files.checkpoint import read_json

    try:
        card = read_json(path)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise DoratError(f"cannot read the card {path} ({e})") from None
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT:
        raise DoratError(f"{path} is not a dorat card (no \"format\": \"{CARD_FORMAT}\"); give a run "
                         "directory or a card written by `dorat eval --model`")
    return card
