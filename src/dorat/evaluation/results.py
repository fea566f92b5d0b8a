"""A run's results on disk, read without training anything: its config (config.yaml), its
final evaluation (metrics.json, or eval.json from `dorat eval`), its epochs (log.jsonl) and its
last epoch's example weights (weights.safetensors); the splits its config defines. Reports,
tuning, grids and run directories read runs through here."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dorat import config as cfglib
from dorat.config import Config
from dorat.data import Dataset
from dorat.data.loader import Split, make_splits
from dorat.errors import DoratError
from dorat.files.checkpoint import load_state, read_json


def run_splits(cfg: Config, data: Dataset) -> tuple[Split, Split | None]:
    """The run's training split and held-out validation split, as its config defines them."""
    d = cfg.data
    return make_splits(data.x_train, data.y_train, data.num_classes, cfg.seed,
                       val_size=d.val_size, train_subset=d.train_subset,
                       imbalance_ratio=d.imbalance_ratio)


def read_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DoratError(f"{run_dir} is not a dorat run (no config.yaml); pass a train --out dir")
    data, source = cfglib.load_yaml(str(run_dir / "config.yaml"))
    return cfglib.from_dict(data, source)


def load_metrics(run_dir: str | Path, name: str = "metrics.json") -> dict[str, Any]:
    return read_json(Path(run_dir) / name)


@dataclass
class RunResult:
    name: str
    path: Path
    config: Config | None  # None for a card (dorat eval --model)
    metrics: dict[str, Any]
    metrics_file: str
    log: list[dict[str, Any]] = field(default_factory=list)
    weights: Any = None  # the last epoch's per-example tensors {"w", "y", "loss"?, "idx"?} or None

    @property
    def reweights(self) -> bool:
        return any(r.get("ess", 1.0) < 0.999 for r in self.log)


def load_result(run_dir: str | Path, metrics_file: str = "auto", name: str | None = None) -> RunResult:
    """A finished run's results; ``metrics_file`` 'auto' prefers eval.json (from `dorat eval`)."""
    d = Path(run_dir)
    config = read_config(d)
    if metrics_file == "auto":
        metrics_file = "eval.json" if (d / "eval.json").is_file() else "metrics.json"
    mpath = d / metrics_file
    if not mpath.is_file():
        raise DoratError(f"{d} has no {metrics_file}: the run has not finished (resume it with "
                         f"`dorat train --out {d} --resume`) or name another file with --metrics")
    try:
        metrics = read_json(mpath)
    except ValueError as e:
        raise DoratError(f"cannot read the results in {d}: {e}") from None
    log = read_log(d)
    weights = None
    if (d / "weights.safetensors").is_file():
        weights, _ = load_state(d / "weights.safetensors")
    return RunResult(name or d.name, d, config, metrics, metrics_file, log, weights)


def read_log(d: Path) -> list[dict[str, Any]]:
    """The epochs of RUN_DIR/log.jsonl (none if it is missing), up to a torn last line."""
    log: list[dict[str, Any]] = []
    if (d / "log.jsonl").is_file():
        for line in (d / "log.jsonl").read_text().splitlines():
            try:
                log.append(json.loads(line))
            except ValueError:
                break
    return log
