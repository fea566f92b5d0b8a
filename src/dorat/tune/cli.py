"""`dorat tune` on the command line (see dorat.tune)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from dorat.config.parts import load_plugins
from dorat.errors import DoratError
from dorat.training.tracking import add_log_option, log_flags
from dorat.tune import tune


def add_parser(sub: argparse._SubParsersAction,
               add_plugin: Callable[[argparse.ArgumentParser], None]) -> None:
    """`dorat tune`'s arguments (dorat.cli builds the parser)."""
    p = sub.add_parser("tune", help="hyper-parameter search on Optuna, scored on the validation split",
                       description=(
        "Search hyper-parameters with Optuna: each trial trains on the training split and is "
        "scored on the validation split (never the test set); per-epoch validation probes feed "
        "the pruner. Processes on one --storage and --study share the study. Writes OUT/best.yaml "
        "(for dorat train --config), OUT/tune.md and OUT/tune.png. Needs dorat[tune]."))
    p.add_argument("--config", help="preset name or YAML file (the base of every trial)")
    p.add_argument("--method", help="training method preset")
    p.add_argument("--dataset", help="dataset name, npz:PATH or imagefolder:DIR")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every trial (repeatable)")
    p.add_argument("--space", action="append", default=[], metavar="KEY=SPEC",
                   help="a searched key: KEY=log:LOW:HIGH, KEY=LOW:HIGH, KEY=int:LOW:HIGH or "
                        "KEY=A,B,C; a bare name means the one key so named (r = done.r); repeatable")
    p.add_argument("--objective", required=True, metavar="METRIC",
                   help="validation metric in %%, e.g. val.worst_class.pgd, val.ra.worst, val.tail30.cw")
    p.add_argument("--direction", choices=["maximize", "minimize"], default="maximize")
    p.add_argument("--constraint", action="append", default=[], metavar="EXPR",
                   help='e.g. "val.sa >= at.val.sa - 1" (at: a reference run of that method, '
                        "trained once in OUT/ref-at); repeatable")
    add_log_option(p)
    p.add_argument("--trials", type=int, default=20, help="finished trials of the study, over all "
                                                          "processes (default 20)")
    p.add_argument("--storage", metavar="URL", help="Optuna storage (default sqlite:///OUT/tune.db; "
                                                      "any RDB URL Optuna accepts)")
    p.add_argument("--study", default="dorat", help="study name (default dorat)")
    p.add_argument("--out", required=True, help="directory for the trials' runs and the outputs")
    p.add_argument("--pruner", choices=["median", "none"], default="median")
    p.add_argument("--prune-startup", type=int, default=5, metavar="N",
                   help="median pruner: prune only once N trials have finished (Optuna's default 5)")
    p.add_argument("--prune-warmup", type=int, default=0, metavar="EPOCHS",
                   help="median pruner: never prune before this epoch (Optuna's default 0)")
    p.add_argument("--sampler-seed", type=int, metavar="S",
                   help="TPE sampler seed: trial N draws from a stream seeded by (S, N), the same "
                        "in every process")
    p.add_argument("--heartbeat", type=int, default=30, metavar="S",
                   help="seconds between a running trial's heartbeats; a trial silent for 4x this "
                        "(its process died) is failed and retried, resuming its run (default 30)")
    add_plugin(p)


def command(a: argparse.Namespace) -> int:
    load_plugins(a.plugin)
    flags = {"dataset": a.dataset, "epochs": a.epochs, "seed": a.seed, "device": a.device,
             "data.dir": a.data_dir, "plugins": a.plugin or None, **log_flags(a.log)}
    for name, v, low in (("--prune-startup", a.prune_startup, 0), ("--prune-warmup", a.prune_warmup, 0),
                         ("--heartbeat", a.heartbeat, 1)):
        if v < low:
            raise DoratError(f"{name} must be at least {low}, got {v}")
    path = tune(a.config, a.method, a.space, a.objective, a.constraint, a.trials, a.storage, a.study,
                a.out, a.set, flags, a.direction, a.pruner, a.prune_startup, a.prune_warmup,
                a.sampler_seed, a.heartbeat)
    print(path.read_text())
    return 0
