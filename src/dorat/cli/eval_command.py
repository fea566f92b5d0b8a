"""`dorat eval`: a run directory's model (RUN/eval.json), or a user's own model on a data set's
test set (a card)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dorat.config.parts import load_plugins
from dorat.errors import DoratError


def cmd_eval(a: argparse.Namespace) -> int:
    from dorat.evaluation.evaluate import summary_lines
    from dorat.files.checkpoint import check_output_file, write_json_atomic
    from dorat.runs.run import eval_journal, evaluate_run, load_run
    from dorat.runs.rundir import own_finished

    load_plugins(a.plugin)
    external = [o for o, v in (("--model", a.model), ("--weights", a.weights), ("--dataset", a.dataset),
                               ("--normalize", a.normalize), ("--norm", a.norm)) if v is not None]
    if a.run_dir is None and a.model is None:
        raise DoratError("name a RUN_DIR to evaluate, or your own model with --model MODULE:FACTORY "
                         "--dataset NAME")
    if a.run_dir is not None and external:
        raise DoratError(f"{external[0]} is for evaluating your own model; a RUN_DIR brings its own "
                         "(give one or the other)")
    for flag, v in (("--steps", a.steps), ("--restarts", a.restarts)):
        if v is not None and v < 1:  # never silently the default
            raise DoratError(f"{flag} must be at least 1, got {v}")
    if a.model is not None:
        return _eval_model(a)
    run_dir = Path(a.run_dir)
    with own_finished(run_dir):  # not while it trains; a journaled --overwrite swap completed
        run = load_run(run_dir, a.device, {
            "data.dir": a.data_dir, "eval.attacks": a.attacks, "eval.n": a.n, "eval.eps": a.eps,
            "eval.steps": a.steps, "eval.restarts": a.restarts, "eval.split": a.split,
            "eval.checks": a.checks}, weights=a.which)
        out = Path(a.out) if a.out else run_dir / ("eval.json" if a.which == "last" else "eval-best.json")
        check_output_file(out, a.overwrite)  # before an evaluation that may take an hour
        metrics = evaluate_run(run, progress=sys.stderr.isatty(),
                               log=lambda m: print(m, file=sys.stderr), journal=eval_journal(out))
        write_json_atomic(out, metrics)
    print("\n".join(summary_lines(metrics)))
    print(f"results in {out}")
    return 0


def _eval_model(a: argparse.Namespace) -> int:
    """`dorat eval --model`: a user's model on a dataset's test set → a card."""
    from dorat.data import get_spec
    from dorat.evaluation import card as cards
    from dorat.evaluation.evaluate import check_attacks, summary_lines
    from dorat.files.checkpoint import check_output_file, write_json_atomic
    from dorat.runs.run import eval_journal

    if a.dataset is None:
        raise DoratError("--model needs --dataset NAME (the test set to evaluate on, e.g. cifar10)")
    if a.split == "val":
        raise DoratError("--split val is for dorat runs (their held-out split); --model evaluates on "
                         "the test set")
    if not a.dataset.startswith(("npz:", "imagefolder:")):
        get_spec(a.dataset)  # an unknown name fails here, before the model is built
    attacks = [t.strip() for t in a.attacks.split(",")] if a.attacks else ["pgd", "cw", "aa"]
    check_attacks(attacks)
    out = Path(a.out or "card.json")
    check_output_file(out, a.overwrite)  # before an evaluation that may take an hour
    model = cards.build_external(a.model)
    info: dict[str, Any] = {"factory": a.model, "weights": None,
                            "parameters": sum(p.numel() for p in model.parameters())}
    if a.weights is not None:
        cards.load_external_weights(a.weights, model)
        info.update(weights=Path(a.weights).name, weights_sha256=cards.sha256(Path(a.weights)))
    card = cards.benchmark(
        model, a.dataset, a.eps, 1000 if a.n is None else a.n, attacks, norm=a.norm or "linf",
        steps=a.steps or 20, restarts=a.restarts or 1, checks=a.checks is not False,
        data_dir=a.data_dir, device=a.device, normalize=a.normalize, model_info=info,
        progress=sys.stderr.isatty(), log=lambda m: print(m, file=sys.stderr),
        journal=eval_journal(out))
    write_json_atomic(out, card)
    print("\n".join(summary_lines(card)))
    print(f"card in {out}")
    return 0
