"""The Python API from the user's own objects: ``dorat.fit(model, train_data, ...)``.

It runs the same loop, checkpoints and run directory as `dorat train`: data given as tensors,
a Dataset or a DataLoader is written to RUN/data.npz and named in the config by its absolute
path, and a model object by its import path, so `dorat eval RUN` can reopen the run in a new
process (a model class that needs constructor arguments: ``dorat.runs.load_run(RUN, model=m)``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dorat import config as cfglib
from dorat.config import Config
from dorat.data import Dataset
from dorat.data.loader import as_examples
from dorat.errors import ConfigError

DATA_FILE = "data.npz"


@dataclass
class Fitted:
    """What ``fit`` returns: the trained model, its final metrics and where the run is."""

    model: nn.Module
    metrics: dict[str, Any]
    run_dir: Path
    config: Config


def _tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors/arrays, a map-style Dataset or an iterable of batches,
    checked as `dorat.data.loader.as_examples` checks arrays."""
    if isinstance(data, (str, bytes, Path)):
        raise ConfigError(f"{what}: give (x, y) tensors, a Dataset or a DataLoader, not a path (a "
                          f"file of images: dorat train --dataset npz:PATH)")
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        x, y = data
    elif isinstance(data, torch.utils.data.DataLoader) or (
            isinstance(data, Iterable) and not hasattr(data, "__getitem__")):
        batches = [(torch.as_tensor(bx), torch.as_tensor(by)) for bx, by in data]
        if not batches:
            raise ConfigError(f"{what}: the DataLoader gave no batches")
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    elif hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ConfigError(f"{what} holds no examples")
        items = [data[i] for i in range(len(data))]
        x = torch.stack([torch.as_tensor(i[0]) for i in items])
        y = torch.as_tensor([int(i[1]) for i in items])
    else:
        raise ConfigError(f"{what}: give (x, y) tensors, a Dataset of (image, label) or a DataLoader; "
                          f"got {type(data).__name__}")
    return as_examples(x, y, what)


def fit(model: nn.Module | str, train_data: Any, test_data: Any = None, *, method: str = "at",
        out: str | Path | None = None, config: str | None = None, overwrite: bool = False,
        set: Mapping[str, Any] | None = None, classes: Sequence[str] | None = None, log: Any = None,
        **overrides: Any) -> Fitted:
    """Train ``model`` (an nn.Module, or a registered model name) with ``method`` on
    ``train_data`` and evaluate it on ``test_data`` (default: a seeded, stratified 10% of the
    training data, held out: the model never trains on it). Config keys come from ``config``
    (a preset or YAML), ``set`` (dotted keys) and keyword overrides (``epochs=5``, ``attack__eps=0.1`` for
    ``attack.eps``, ``init="RUN"`` to start from a trained run's or a file's weights,
    ``optim__ema=0.995`` for weight averaging). ``classes``: one name per class, for the metrics
    and reports (default "0", "1", ...). Returns the trained model, its metrics and the run
    directory."""
    from dorat.data.readers import check_labels
    from dorat.runs.run import prepare, train

    updates = _updates(method, overrides, set or {})
    x, y = _tensors(train_data, "train_data")
    if test_data is None:
        num_classes = check_labels("train_data", y.numpy(), y[:0].numpy())
        x, y, xt, yt = _hold_out(x, y, num_classes, int(updates.get("seed", 0)))
    else:
        xt, yt = _tensors(test_data, "test_data")
        if xt.shape[1:] != x.shape[1:]:
            raise ConfigError(f"test_data images {tuple(xt.shape[1:])} differ from train_data's "
                              f"{tuple(x.shape[1:])}")
        num_classes = check_labels("fit's data", y.numpy(), yt.numpy())
    out = Path(out) if out is not None else Path("runs") / f"fit-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (out / "config.yaml").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a run; pass overwrite=True to replace it, or "
                          "another out")
    # a model object is recorded by its import path (reopened with no constructor arguments)
    updates["model"] = _import_path(model, log) if isinstance(model, nn.Module) else model
    updates["dataset"] = f"npz:{(out / DATA_FILE).resolve()}"
    cfg = cfglib.resolve(config, overrides=updates)  # validated before anything is written
    names = [str(c) for c in (range(num_classes) if classes is None else classes)]
    if len(names) != num_classes:
        raise ConfigError(f"classes names {len(names)} classes but the labels are 0..{num_classes - 1}; "
                          "give one name per class")
    data = Dataset(cfg.dataset, x, y, xt, yt, names)
    user_model = model if isinstance(model, nn.Module) else None
    prepare(cfg, data=data, model=user_model)  # the data, the method and one forward pass
    out.mkdir(parents=True, exist_ok=True)
    _save_npz(out / DATA_FILE, data)
    metrics = train(cfg, out, overwrite=overwrite, log=log, data=data, model=user_model)
    from dorat.runs.run import load_run

    run = load_run(out, cfg.device, model=user_model,
                   data=data)  # in memory: RUN/data.npz is for later processes
    return Fitted(run.model, metrics or {}, out, cfg)


def _updates(method: str, overrides: Mapping[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys of fit's keyword overrides (``a__b`` is ``a.b``) and ``set``; a key given
    in both with two values is refused, not silently decided."""
    keys = {k.replace("__", "."): v for k, v in overrides.items()}
    for k, v in sets.items():
        if k in keys and keys[k] != v:
            raise ConfigError(f"{k} is given twice, as a keyword ({keys[k]!r}) and in set ({v!r}); "
                              "give it once")
    if "method" in keys or "method" in sets:
        raise ConfigError("give the method as fit(..., method=NAME), not as a config key")
    return {"method": method, **keys, **dict(sets)}


def _import_path(model: nn.Module, log: Any) -> str:
    """``module:Class`` of a model object, with a warning when no other process can import it
    (a class defined in the script being run, or inside a function)."""
    cls = type(model)
    path = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        (log or print)(f"warning: the model class {path} is defined in the running script (or a "
                       "function), so `dorat eval RUN` in another process cannot rebuild it; put it "
                       "in a module (e.g. mynet.py beside the script), or reopen the run with "
                       "dorat.runs.load_run(RUN, model=...)")
    return path


def _hold_out(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int
              ) -> tuple[torch.Tensor, ...]:
    """A seeded, stratified 10% of (x, y) as the test set (at least one example per class)."""
    from dorat.data.loader import stratified_indices

    counts = torch.bincount(y, minlength=num_classes).tolist()
    if min(counts) < 2:
        raise ConfigError("train_data has a class with fewer than 2 examples: pass test_data, or "
                          "more data (fit holds out 10% of each class as the test set)")
    test = stratified_indices(y, [max(1, c // 10) for c in counts], seed, salt=13)
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[test] = False
    return x[keep], y[keep], x[test], y[test]


def _save_npz(path: Path, data: Dataset) -> None:
    """The run's data in the npz format dorat reads (N×H×W×C; uint8 or float in [0, 1])."""
    from dorat.files.checkpoint import atomic_path

    def arr(t: torch.Tensor) -> np.ndarray:
        return t.permute(0, 2, 3, 1).numpy()

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, x_train=arr(data.x_train), y_train=data.y_train.numpy(), x_test=arr(data.x_test),
                 y_test=data.y_test.numpy(), classes=np.array(data.classes))
