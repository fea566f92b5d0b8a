"""Experiment tracking beside log.jsonl: TensorBoard event files in RUN/tb (``log.tensorboard``)
and MLflow runs (``log.mlflow``).

Per epoch: every number of the log line as a scalar (loss, clean/adversarial accuracy, lr,
seconds, ex/s, ESS, largest weight, weight sums, r, the validation cost, ...), each class's
mean weight (``weights/class_mean/<class>``) and parameters a weighting logs per class (ε_c,
β_c, class weights, class losses: ``class/<key>/<class>``), and a histogram of the epoch's
instance weights (in units of the uniform weight). After the final evaluation: SA, RA per
attack and the per-class robust accuracies (``final/...``) at the last epoch's step.

Only the main process writes. A resumed run purges the events after its checkpoint's epoch
(``purge_step``), so curves never hold an epoch twice.

MLflow (class ``MLflow``): one MLflow run per dorat run, with the same numbers under the same
names (metrics with the epoch as step), the resolved config as parameters, the final numbers,
and metrics.json, config.yaml, log.jsonl and the run's report (Markdown and PNGs) as artifacts.
The store is ``log.mlflow_uri`` (``mlflow_store``); RUN/mlflow.json names the MLflow run, so a
resume continues it, and each epoch is sent once, after its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dorat.errors import ConfigError

if TYPE_CHECKING:  # this module stays light: the CLI's parsers import it (--log) before torch
    import torch

EXTRA = "dorat[tensorboard]"
TB_DIR = "tb"  # in the run directory: TensorBoard's event files


def _writer_class() -> Any:
    try:
        import tensorboard  # noqa: F401  (SummaryWriter needs it and fails late without it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(f"log.tensorboard needs the tensorboard package: pip install '{EXTRA}' "
                          "(or pip install tensorboard), or turn it off") from None
    return SummaryWriter


TRACKERS = ("tensorboard", "mlflow")


def add_log_option(p: Any) -> None:
    """``--log tensorboard|mlflow`` of `dorat train`, `compare` and `tune`."""
    p.add_argument("--log", action="append", choices=TRACKERS, default=[],
                   help="also track the run(s): tensorboard = event files in RUN/tb "
                        "(log.tensorboard); mlflow = an MLflow run each, in log.mlflow_uri "
                        "(default $MLFLOW_TRACKING_URI, else ./mlruns; log.mlflow)")


def log_flags(chosen: Sequence[str]) -> dict[str, Any]:
    """``--log`` as config flags (None: not given, the config decides)."""
    return {f"log.{name}": True if name in chosen else None for name in TRACKERS}


def check_available(tensorboard: bool, mlflow: bool = False) -> None:
    """Before training: a requested tracker whose package is missing is one clear error."""
    if tensorboard:
        _writer_class()
    if mlflow:
        _mlflow()


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


def epoch_scalars(record: dict[str, Any], classes: Sequence[str]) -> Iterator[tuple[str, float]]:
    """An epoch's log record as (tag, value): ``train/<key>``, ``val/<key>`` for the probe's,
    ``weights/class_mean/<class>`` and ``class/<key>/<class>`` for per-class lists."""
    for k, v in record.items():
        if k == "epoch":
            continue
        tag = f"val/{k[4:]}" if k.startswith("val_") and k != "val_seconds" else f"train/{k}"
        if isinstance(v, bool):
            yield tag, float(v)
        elif isinstance(v, (int, float)) and math.isfinite(v):
            yield tag, float(v)
        elif isinstance(v, list) and len(v) == len(classes) and all(isinstance(t, (int, float)) for t in v):
            group = "weights/class_mean" if k == "w_class_mean" else f"class/{k}"
            yield from ((f"{group}/{name}", float(t)) for name, t in zip(classes, v) if math.isfinite(t))


def final_scalars(metrics: dict[str, Any], classes: Sequence[str]) -> Iterator[tuple[str, float]]:
    """The final evaluation as (tag, value): ``final/sa``, ``final/ra/<attack>``,
    ``final/worst_class/<attack>``, ``final/tail30/<attack>``, ``final/per_class/<attack>/<class>``."""
    yield "final/sa", float(metrics["sa"])
    for group in ("ra", "worst_class", "tail30"):
        for attack, v in metrics.get(group, {}).items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                yield f"final/{group}/{attack}", float(v)
    for attack, per_class in metrics["per_class"].items():
        for name, v in zip(classes, per_class):
            if v is not None and math.isfinite(v):
                yield f"final/per_class/{attack}/{name}", float(v)


class TensorBoard:
    """Writes a run's curves to RUN/tb; ``start_epoch`` > 0 when resuming."""

    def __init__(self, run_dir: Path, classes: Sequence[str], start_epoch: int = 0) -> None:
        writer = _writer_class()
        self.classes = [_safe(c) for c in classes]
        self.w = writer(log_dir=str(Path(run_dir) / TB_DIR), purge_step=start_epoch + 1)

    def epoch(self, record: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> None:
        step = int(record["epoch"])
        for tag, v in epoch_scalars(record, self.classes):
            self.w.add_scalar(tag, v, step)
        if weights is not None and len(weights.get("w", ())):
            self.w.add_histogram("weights/instance", weights["w"].float(), step)
        self.w.flush()

    def final(self, metrics: dict[str, Any], step: int) -> None:
        for tag, v in final_scalars(metrics, self.classes):
            self.w.add_scalar(tag, v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


# -- MLflow ------------------------------------------------------------------------------------

MLFLOW_EXTRA = "dorat[mlflow]"
MLFLOW_FILE = "mlflow.json"  # in the run directory: the MLflow run that mirrors it
SYNCED = "dorat.synced_epoch"  # run tag: the last epoch of log.jsonl sent (with it, atomically)


def _mlflow() -> Any:
    try:
        import mlflow  # noqa: F401
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ConfigError(f"log.mlflow needs the mlflow package: pip install '{MLFLOW_EXTRA}' "
                          "(or pip install mlflow), or turn it off") from None
    for name in ("mlflow", "alembic"):  # a new SQLite store announces its migrations at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient


def mlflow_store(setting: str) -> tuple[str, str | None]:
    """(tracking URI, artifact location of a new experiment) for ``log.mlflow_uri``: a URL
    (sqlite:///..., http(s)://..., databricks, postgresql://...) as it is; a local directory
    (the default ``mlruns``, or $MLFLOW_TRACKING_URI when set) as an SQLite store DIR/mlflow.db
    with the artifacts in DIR/artifacts (MLflow's own file store is in maintenance mode)."""
    uri = setting or os.environ.get("MLFLOW_TRACKING_URI", "") or "mlruns"
    if "://" in uri or uri.startswith("databricks"):
        return uri, None
    d = Path(uri).expanduser().resolve()
    return f"sqlite:///{d / 'mlflow.db'}", (d / "artifacts").as_uri()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def connect_mlflow(setting: str) -> Any:
    """A client of the store ``log.mlflow_uri`` names, once it answered; a missing package or an
    unreachable store is one ConfigError, before anything is trained."""
    client_class = _mlflow()
    uri, artifacts = mlflow_store(setting)
    if artifacts is not None:
        where = Path(uri.removeprefix("sqlite:///")).parent
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"log.mlflow_uri: cannot create {where} ({e.strerror}); choose another "
                              "directory (--set log.mlflow_uri=DIR)") from None
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update({k: v for k, v in quick.items() if saved[k] is None})  # a quick first answer
    try:
        client = client_class(uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001  (any store: SQL, HTTP, a plug-in's)
        raise ConfigError(f"log.mlflow_uri {uri}: the MLflow tracking store does not answer "
                          f"({_first_line(e)}); start it, fix --set log.mlflow_uri=..., or turn "
                          "MLflow off") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
    return client


def parse_tags(text: str) -> dict[str, str]:
    """``log.mlflow_tags``: "key=value,key=value" (compare and tune add theirs)."""
    tags = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"log.mlflow_tags: '{item}' is not key=value; write e.g. "
                              "log.mlflow_tags=team=vision,purpose=ablation")
        tags[key.strip()] = value.strip()
    return tags


def with_tags(text: str, **tags: Any) -> str:
    """``log.mlflow_tags`` with ``tags`` added (``dorat_grid`` -> ``dorat.grid``; commas in values
    become semicolons)."""
    merged = {**parse_tags(text), **{k.replace("_", "."): str(v).replace(",", ";") for k, v in tags.items()}}
    return ",".join(f"{k}={v}" for k, v in merged.items())


BATCH = 900  # metrics a log_batch call takes with room to spare (MLflow: 1000 entities)


def _send(client: Any, run_id: str, metrics: list[Any], tags: list[Any]) -> None:
    """``metrics`` in batches, ``tags`` with the last one (at least one call, so tags alone go)."""
    for i in range(0, max(len(metrics), 1), BATCH):
        last = i + BATCH >= len(metrics)
        client.log_batch(run_id, metrics=metrics[i:i + BATCH], tags=tags if last else [])


class MLflow:
    """One MLflow run per dorat run, its id kept in RUN/mlflow.json: created on the first start
    (the resolved config as parameters, tags naming the run), reopened on every resume. The
    epochs are sent from log.jsonl once their checkpoint is written, each epoch once: the last
    one sent is a run tag written in the same batch as the epoch's metrics."""

    def __init__(self, client: Any, run_dir: Path, cfg: Any, classes: Sequence[str], shown_dir: Path,
                 log: Any) -> None:
        from mlflow.entities import Param

        from dorat.files.checkpoint import write_json_atomic

        self.client, self.dir, self.classes = client, run_dir, [_safe(c) for c in classes]
        self.ended = False
        saved = json.loads((run_dir / MLFLOW_FILE).read_text()) if (run_dir / MLFLOW_FILE).is_file() else None
        if saved is not None and saved.get("uri") == client.tracking_uri:
            self.run_id = saved["run_id"]
            client.update_run(self.run_id, status="RUNNING")
            log(f"MLflow: continuing run {self.run_id} in {client.tracking_uri}")
            return
        name = cfg.log.mlflow_experiment
        exp = client.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = client.create_experiment(name, artifact_location=mlflow_store(cfg.log.mlflow_uri)[1])
            except Exception:  # noqa: BLE001  another process created it first
                exp_id = client.get_experiment_by_name(name).experiment_id
        else:
            exp_id = exp.experiment_id
        tags = {"dorat.run_dir": str(shown_dir.resolve()), "dorat.method": cfg.method.name,
                "dorat.dataset": cfg.dataset, "dorat.model": str(cfg.model), "dorat.seed": str(cfg.seed),
                SYNCED: "0", **parse_tags(cfg.log.mlflow_tags)}
        run = client.create_run(exp_id, tags=tags, run_name=f"{cfg.method.name} s{cfg.seed} {shown_dir.name}")
        self.run_id = run.info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in cfg.flat().items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a batch
            client.log_batch(self.run_id, params=params[i:i + 100])
        write_json_atomic(run_dir / MLFLOW_FILE, {"uri": client.tracking_uri, "run_id": self.run_id,
                                                  "experiment_id": exp_id})
        log(f"MLflow: run {self.run_id} in {client.tracking_uri} (experiment {name})")

    def sync(self) -> None:
        """Send the epochs of log.jsonl not sent yet (after a resume: those the crash lost)."""
        from mlflow.entities import Metric, RunTag

        from dorat.evaluation.results import read_log

        done = int(self.client.get_run(self.run_id).data.tags.get(SYNCED, "0"))
        now = int(time.time() * 1000)
        for record in read_log(self.dir):
            step = int(record["epoch"])
            if step <= done:
                continue
            metrics = [Metric(tag, v, now, step) for tag, v in epoch_scalars(record, self.classes)]
            _send(self.client, self.run_id, metrics, [RunTag(SYNCED, str(step))])

    def final(self, metrics: dict[str, Any], step: int, files: Sequence[Path]) -> None:
        """The final evaluation's numbers at the last epoch's step, the run's files as artifacts
        (files under a directory keep their directory's name), and the run FINISHED."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.sync()
        scalars = [Metric(tag, v, now, step) for tag, v in final_scalars(metrics, self.classes)]
        _send(self.client, self.run_id, scalars, [])
        for f in files:
            self.client.log_artifact(self.run_id, str(f), artifact_path=f.parent.name if f.parent != self.dir
                                     else None)
        self.end("FINISHED")

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
        self.ended = True
