"""Command line: ``dorat train | eval | data``.

User errors (bad config value, missing data, wrong checkpoint) print one line
``dorat: error: ...`` and exit with code 2, leaving nothing half-written.

``eval_command``: ``dorat eval``. Imports: any layer; only ``python -m dorat`` imports it
(tests/test_layers.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from dorat import config as cfglib
from dorat.config.parts import load_plugins
from dorat.errors import DoratError, Terminated, raise_terminated
from dorat.training.tracking import add_log_option, log_flags

EXIT_USER_ERROR = 2
EXIT_TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM killed


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"dorat: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _add_train(sub: argparse._SubParsersAction) -> None:
    from dorat.data import dataset_names
    from dorat.models import model_names

    p = sub.add_parser("train", help="train a model", description=(
        "Train a robust classifier. Methods: " + ", ".join(cfglib.method_names()) +
        ". Datasets: " + ", ".join(dataset_names()) + ". Models: " + ", ".join(model_names()) +
        ". Presets for --config: " + ", ".join(cfglib.preset_names()) + "."))
    p.add_argument("--method", help="training method preset")
    p.add_argument("--dataset", help="dataset name, npz:PATH or imagefolder:DIR")
    p.add_argument("--model", help="model architecture")
    p.add_argument("--init", metavar="RUN_OR_WEIGHTS",
                   help="start from trained weights: a run directory (its model.safetensors) or a "
                        "weights file (.safetensors or a state dict); recorded in RUN/init.json")
    p.add_argument("--epochs", type=int)
    p.add_argument("--out", help="RUN_DIR for config, log, checkpoints and metrics")
    p.add_argument("--config", help="preset name or YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set attack.eps=0.1 (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--data-dir", help="directory holding the dataset files")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its checkpoint (safe to repeat: starts it "
                        "when there is none, reports it when finished); --set may change optim.*, "
                        "eval.*, log.*, perf.*, val.* and --epochs")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a run already in --out (the new one is built in --out/.next "
                        "and replaces it only when it finishes)")
    p.add_argument("--channels-last", choices=["auto", "on", "off"],
                   help="channels-last memory format (perf.channels_last; default auto = on for "
                        "CPU and CUDA)")
    p.add_argument("--amp", choices=["auto", "off", "bf16"], help="bf16 autocast in training (perf.amp)")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (perf.compile)")
    p.add_argument("--sync-bn", action="store_true", default=None,
                   help="SyncBatchNorm when launched with torchrun on GPUs (perf.sync_bn)")
    p.add_argument("--co-restore", action="store_true", default=None,
                   help="when the catastrophic-overfitting guard fires, stop and keep the best "
                        "epoch's weights (val.co_restore)")
    add_log_option(p)
    p.add_argument("--list-keys", action="store_true",
                   help="print every config key with its type, default and help, and exit")
    _add_plugin(p)


def _add_plugin(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plugin", action="append", default=[], metavar="MODULE",
                   help="import MODULE first: it registers its own parts (attacks, losses, "
                        "weightings, models; repeatable; recorded in the run's config)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a trained run, or any model (--model)", description=(
        "Evaluate RUN_DIR/model.safetensors under attacks; prints the summary and writes JSON. "
        "With --model instead of RUN_DIR: any nn.Module from an importable factory, with weights "
        "from safetensors or a state dict (never unpickling code), evaluated on a dataset's test "
        "set; writes a card (RobustBench-like JSON with per-class and worst-class accuracy)."))
    p.add_argument("run_dir", nargs="?", help="a dorat run directory (or use --model)")
    p.add_argument("--model", metavar="MODULE:FACTORY", help="evaluate your own model: a function "
                   "or class (no arguments) returning the nn.Module, e.g. my_pkg.nets:make_model")
    p.add_argument("--weights", help="--model: its weights, .safetensors or a torch.save'd "
                   "state dict (.pt/.pth); default: as the factory returns the model")
    p.add_argument("--dataset", help="--model: the dataset whose test set to use (e.g. cifar10)")
    p.add_argument("--normalize", metavar="MEAN,STD", help="--model: the model expects normalised "
                   "inputs; MEAN,STD or C means then C stds (the attacks stay in [0, 1] pixels)")
    p.add_argument("--norm", choices=["linf", "l2"], help="--model: threat model (default linf)")
    p.add_argument("--attacks", help="comma-separated from pgd, cw, aa (AutoAttack standard); "
                   "default: the run's eval.attacks")
    p.add_argument("--n", type=int, help="stratified test subset size (default: the run's)")
    p.add_argument("--eps", type=float, help="threat radius (default: the run's)")
    p.add_argument("--steps", type=int, help="attack iterations")
    p.add_argument("--restarts", type=int, help="random restarts per attack")
    p.add_argument("--split", choices=["test", "val"], help="evaluate on the test set or the "
                   "held-out validation split (data.val_size)")
    p.add_argument("--checks", action=argparse.BooleanOptionalAction, default=None,
                   help="run the sanity checks (default: the run's eval.checks)")
    p.add_argument("--out", help="metrics JSON file (default RUN_DIR/eval.json; with --model "
                   "card.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation in the --out file")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    p.add_argument("--which", choices=["last", "best"], default="last",
                   help="the run's weights: last (model.safetensors) or best (best.safetensors, "
                        "kept with val.keep_best); default last")
    p.add_argument("--data-dir")
    _add_plugin(p)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown report with plots for finished runs", description=(
        "Write OUT/report.md with the results table of the runs and PNG plots: per-class robust "
        "accuracy, training curves, and weight diagnostics for reweighting methods."))
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories, or cards "
                   "(card.json from `dorat eval --model`)")
    p.add_argument("--out", required=True, help="directory for report.md and the PNGs")
    p.add_argument("--metrics", default="auto", help="metrics file in each RUN_DIR (default: "
                   "eval.json when present, else metrics.json)")
    p.add_argument("--title", default="dorat report")


def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="run a grid of methods x seeds and aggregate", description=(
        "Train and evaluate every run a compare file names (datasets, settings, methods with "
        "overrides, seeds); finished runs are skipped and interrupted ones "
        "resumed, so it can be restarted at any time. Writes OUT/results.json, OUT/results.md "
        "(mean ± std over seeds) and OUT/report.md with plots. See `dorat.compare` for the file "
        "format; bundled files: demo."))
    p.add_argument("file", metavar="COMPARE.yaml", help="compare file, or a bundled name (demo)")
    p.add_argument("--out", required=True, help="directory for the runs and the aggregated results")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--data-dir")
    p.add_argument("--methods", help="comma-separated method names of the file to run now, each "
                   "also as SETTING/METHOD for one setting only, e.g. balanced/wat-at (the "
                   "aggregate still covers every finished run)")
    p.add_argument("--retry-failed", action="store_true",
                   help="train again the runs that failed before (RUN/failed.json)")
    p.add_argument("--aggregate-only", action="store_true",
                   help="do not train: aggregate whatever runs have finished")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="run the grid in N processes (default 1): on CPU each gets cores/N threads, "
                        "with CUDA each gets one GPU in turn. Several compare commands on the same "
                        "--out also share the grid (each run is locked while one works on it)")
    p.add_argument("--launcher", choices=["local", "slurm"], default="local",
                   help="local: this machine (--workers); slurm: one Slurm job per run through "
                        "submitit (job ids in OUT/slurm-jobs.json; run the command again to follow, "
                        "resubmit what ended unfinished, and aggregate)")
    p.add_argument("--slurm-partition", help="slurm: the partition (default: the cluster's)")
    p.add_argument("--slurm-time", type=int, metavar="MIN",
                   help="slurm: each job's time limit in minutes (default 1440; a job that reaches "
                        "it is requeued and resumes)")
    p.add_argument("--slurm-cpus", type=int, metavar="N", help="slurm: CPUs per job (default 1)")
    p.add_argument("--slurm-gpus", type=int, metavar="N", help="slurm: GPUs per job (default 0)")
    p.add_argument("--slurm-mem", type=float, metavar="GB", help="slurm: memory per job in GB")
    p.add_argument("--slurm-sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: any other sbatch option, e.g. account=proj or qos=high (repeatable)")
    p.add_argument("--no-wait", action="store_true",
                   help="slurm: submit and return (aggregating what has finished so far)")
    add_log_option(p)
    _add_plugin(p)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="fetch or check datasets")
    dsub = p.add_subparsers(dest="data_cmd", required=True, parser_class=_Parser)
    for name, desc in [("fetch", "make NAME available (find it or download with checksums)"),
                       ("check", "say where NAME is, or fail if it is not on this machine")]:
        q = dsub.add_parser(name, help=desc, description=desc)
        q.add_argument("name")
        q.add_argument("--data-dir")
    dsub.add_parser("list", help="list the datasets dorat can read")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dorat", description=(
        "dorat: doubly robust instance-reweighted adversarial training (DONE), baselines, and "
        "a worst-class-aware robustness evaluator."))
    from dorat import __version__

    p.add_argument("--version", action="version", version=f"dorat {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_eval(sub)
    _add_report(sub)
    _add_compare(sub)
    from dorat.tune.cli import add_parser as _add_tune

    _add_tune(sub, _add_plugin)
    _add_data(sub)
    return p


def cmd_train(a: argparse.Namespace) -> int:
    from dorat.evaluation.evaluate import summary_lines
    from dorat.runs.run import train
    from dorat.runs.rundir import flag_changes, has_checkpoint

    if a.list_keys:
        load_plugins(a.plugin)
        print("\n".join(cfglib.describe_keys()))
        return 0
    if not a.out:
        raise DoratError("--out RUN_DIR is required (where config, log, checkpoint and metrics go)")
    flags: dict[str, Any] = {"method": a.method, "dataset": a.dataset, "model": a.model,
                             "init": a.init, "epochs": a.epochs, "seed": a.seed, "device": a.device,
                             "data.dir": a.data_dir, "perf.channels_last": a.channels_last,
                             "perf.amp": a.amp, "perf.compile": a.compile, "perf.sync_bn": a.sync_bn,
                             **log_flags(a.log), "val.co_restore": a.co_restore, "plugins": a.plugin or None}
    cfg = cfglib.resolve(a.config, flags, a.set)
    changes = dict(cfglib.parse_set(item) for item in a.set)
    changes.update(flag_changes(flags, cfg))  # on --resume a flag is a change like --set
    if a.resume and has_checkpoint(Path(a.out)) and a.config:
        print("dorat: note: --resume continues with the run's saved config.yaml; --config is not "
              "read again (change keys with --set)", file=sys.stderr)
    metrics = train(cfg, a.out, resume=a.resume, overwrite=a.overwrite, changes=changes)
    if metrics is not None and os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 reports
        print("\n".join(summary_lines(metrics)))
        print(f"results in {a.out}/metrics.json")
    return 0


def _cmd_tune(a: argparse.Namespace) -> int:
    from dorat.tune.cli import command

    return command(a)


def cmd_eval(a: argparse.Namespace) -> int:
    from dorat.cli.eval_command import cmd_eval

    return cmd_eval(a)


def cmd_report(a: argparse.Namespace) -> int:
    from dorat.report import write_report

    path = write_report(a.run_dirs, a.out, a.metrics, a.title)
    print(f"report: {path}")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from dorat.compare import compare

    if a.workers < 1:
        raise DoratError(f"--workers must be at least 1, got {a.workers}")
    from dorat.compare.slurm import options_from_args

    slurm = options_from_args(a)
    load_plugins(a.plugin)
    path = compare(a.file, a.out, a.device, a.data_dir, progress=sys.stderr.isatty() and a.workers == 1,
                   aggregate_only=a.aggregate_only, retry_failed=a.retry_failed,
                   only=[m for m in a.methods.split(",") if m] if a.methods else None,
                   workers=a.workers, plugins=a.plugin, slurm=slurm, wait=not a.no_wait,
                   tracking=log_flags(a.log))
    print((Path(a.out) / "results.md").read_text())
    print(f"report: {path}")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from dorat.data import SPECS, dataset_names, locate
    from dorat.data.fetch import find_or_fetch, get_spec

    if a.data_cmd == "list":
        for name in dataset_names():
            where = locate(name, None) if name in SPECS else None
            print(f"{name:<14} {where or '-'}")
        return 0
    if getattr(a, "name", "").startswith("imagefolder:"):  # check / fetch: decode and cache
        from dorat.data import describe

        print(describe(a.name, a.data_dir))
        return 0
    if a.data_cmd == "check":
        get_spec(a.name)
        root = locate(a.name, a.data_dir)
        if root is None:
            raise DoratError(f"dataset '{a.name}' is not on this machine; run `dorat data fetch {a.name}`")
        print(f"{a.name}: {root}")
        return 0
    root = find_or_fetch(a.name, a.data_dir)
    from dorat.data import load_dataset

    ds = load_dataset(a.name, a.data_dir, allow_download=False)
    print(f"{a.name}: {root} ({len(ds.y_train)} train, {len(ds.y_test)} test, "
          f"{ds.num_classes} classes, images {tuple(ds.shape)})")
    return 0


def _how_to_continue(cmd: str) -> str:
    if cmd == "eval":  # its journal beside OUT (dorat.runs.run.eval_journal)
        return "run the same command again to continue where the attacks stopped"
    if cmd in ("compare", "tune"):
        return "run the same command again to continue (finished runs are kept, stopped ones resume)"
    return "run the same command with --resume to continue"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from dorat.system.runtime import tune_allocator

    tune_allocator()  # glibc keeps freed memory: far fewer page faults (dorat.system.runtime)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, raise_terminated) if main_thread else None
    try:
        return {"train": cmd_train, "eval": cmd_eval, "report": cmd_report, "compare": cmd_compare,
                "tune": _cmd_tune, "data": cmd_data}[a.cmd](a)
    except DoratError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank fails alike: say it once
            print(f"dorat: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"dorat: interrupted; {_how_to_continue(a.cmd)}", file=sys.stderr)
        return 130
    except Terminated:
        kept = "" if a.cmd == "eval" else "the checkpoint keeps the batches trained: "
        print(f"dorat: terminated (SIGTERM); {kept}{_how_to_continue(a.cmd)}", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
