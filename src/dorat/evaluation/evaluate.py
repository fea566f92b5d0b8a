"""Evaluation: attacks → per-example correctness table → metrics (METHODS.md §3).

Every metric comes from one table: for each test example and each attack, was the model still
correct. ``worst`` is the element-wise AND over all attacks run (an example counts as robust
only if it survives every attack).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from dorat.attacks import PGDSpec, attack_names_problem, mode, pgd
from dorat.attacks.autoattack import autoattack_correct
from dorat.data.loader import as_examples, as_unit_images, balanced_counts, stratified_indices
from dorat.errors import ConfigError
from dorat.evaluation.checks import eps_sweep_checks, sweep_grid, table_checks
from dorat.models import check_fits


@dataclass
class EvalSettings:
    eps: float
    norm: str = "linf"
    steps: int = 20
    alpha: float | None = None  # default eps/4
    restarts: int = 1
    batch_size: int = 500
    seed: int = 0
    aa_version: str = "standard"
    # Tests only: {"iters": .., "queries": .., "targets": ..} shrinks AutoAttack. Numbers made
    # with it are not AutoAttack numbers; metrics record the budget next to them.
    aa_budget: dict[str, int] | None = None
    channels_last: bool = False  # feed batches in NHWC (for a model converted to channels_last)

    @property
    def step_size(self) -> float:
        return self.eps / 4 if self.alpha is None else self.alpha


def stratified_subset(y: torch.Tensor, n: int | None, num_classes: int, seed: int,
                      what: str = "eval.n") -> torch.Tensor:
    """Indices of a seeded, class-stratified subset of size n (all indices if n is None)."""
    if n is None or n >= len(y):
        return torch.arange(len(y))
    return stratified_indices(y.cpu(), balanced_counts(y.cpu(), n, num_classes, what), seed, salt=7)


def _attack_batch(model: nn.Module, attack: str, x: torch.Tensor, y: torch.Tensor,
                  s: EvalSettings, g: torch.Generator, notes: list[str]) -> torch.Tensor:
    """Per-example correctness under one attack (worst over restarts)."""
    if attack == "aa":
        return autoattack_correct(model, x, y, s.eps, s.norm, s.seed, s.aa_version, len(y),
                                  s.aa_budget, notes)
    loss = {"pgd": "ce", "cw": "margin"}[attack]
    correct = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for _ in range(s.restarts):
        idx = correct.nonzero().squeeze(1)  # only examples not yet broken
        if len(idx) == 0:
            break
        spec = PGDSpec(s.eps, s.step_size, s.steps, s.norm, loss, train_mode=False)
        r = pgd(model, x[idx], y[idx], spec, generator=g, final_eval=True)
        correct[idx] = r.correct  # type: ignore[assignment]
    return correct


def check_attacks(attacks: Sequence[str]) -> None:
    problem = attack_names_problem(list(attacks))
    if problem:
        raise ConfigError(f"attack list {','.join(attacks)}: {problem}")


def _journal_key(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks: Sequence[str],
                 settings: EvalSettings, device: torch.device) -> str:
    """What an evaluation journal belongs to: the settings, the attacks, the device (whose
    generator it saved), the exact points and the model's weights. A journal with another key
    is ignored."""
    h = hashlib.sha256(json.dumps({"attacks": list(attacks), "device": device.type,
                                   "settings": dataclasses.asdict(settings)},
                                  sort_keys=True, default=str).encode())
    for t in (x, y, *model.state_dict().values()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{t.numel()}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_journal(path: Path, key: str) -> dict[str, Any] | None:
    from dorat.errors import CheckpointError
    from dorat.files.checkpoint import load_state

    if not path.is_file():
        return None
    try:
        state, _ = load_state(path)
    except CheckpointError:
        return None  # torn or foreign: start over (it is rewritten after the first step)
    return state if state.get("key") == key else None


class _Heartbeat:
    """Where no progress bar shows (a log file, a Slurm job): one line at most every ``every``
    seconds with the steps done, their rate and the time left."""

    def __init__(self, total: int, done: int, log: Callable[[str], None] | None,
                 every: float = 60.0) -> None:
        import time

        self.clock, self.total, self.first, self.log, self.every = time.perf_counter, total, done, log, every
        self.start = self.last = self.clock()

    def step(self, done: int, what: str) -> None:
        now = self.clock()
        if self.log is None or now - self.last < self.every:  # a short evaluation says nothing
            return
        self.last = now
        rate = (done - self.first) / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        self.log(f"eval: {done}/{self.total} (batch, attack) steps ({what} done), "
                 f"{60 * rate:.1f} a minute, about {left / 60:.0f} min left")


def run_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str],
    settings: EvalSettings,
    device: torch.device,
    progress: bool = False,
    notes: list[str] | None = None,
    journal: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The per-example table: {"clean": bool[n], attack: bool[n], ..., "worst": bool[n]}.

    Attacks run batch by batch, each attack on the whole batch (AutoAttack itself attacks only
    the examples still correct). ``notes`` collects warnings AutoAttack raises about the model.

    With ``journal`` (a file path) the table so far and the attack generator's state are saved
    after every (batch, attack) step, and a later call on the same model, points, attacks and
    settings resumes after the last saved step: an interrupted AutoAttack evaluation loses at
    most one batch, and the resumed table is bitwise the one an uninterrupted call gives
    (AutoAttack reseeds itself per batch; PGD and CW draw from the saved generator). The
    journal is deleted when the table is complete.
    """
    check_attacks(attacks)
    if settings.eps < 0:
        raise ConfigError(f"evaluation eps must be >= 0, got {settings.eps}")
    notes = notes if notes is not None else []
    g = torch.Generator(device=device)
    g.manual_seed(settings.seed)
    steps = ["clean", *attacks]
    table = {k: torch.zeros(len(y), dtype=torch.bool) for k in steps}
    bs = settings.batch_size
    n_batches = math.ceil(len(y) / bs)
    total = n_batches * len(steps)
    key, done = "", 0
    if journal is not None:
        key = _journal_key(model, x, y, attacks, settings, device)
        saved = _read_journal(journal, key)
        if saved is not None:
            done = int(saved["done"])
            table = {k: v.clone() for k, v in saved["table"].items()}
            g.set_state(saved["generator"].to(torch.uint8))
            notes.extend(m for m in saved["notes"] if m not in notes)
            if log is not None:
                log(f"resuming the evaluation after {done} of {total} (batch, attack) steps "
                    f"({journal.name})")

    def save(step: int) -> None:
        if journal is not None:
            from dorat.files.checkpoint import save_state

            save_state(journal, {"key": key, "done": step, "table": table,
                                 "generator": g.get_state(), "notes": list(notes)})

    bar = tqdm(total=total, initial=done, desc="eval", disable=not progress, leave=False,
               unit="batch")
    quiet = _Heartbeat(total, done, log if not progress else None)  # no bar: a line a minute
    with mode(model, False):
        for b in range(n_batches):
            if (b + 1) * len(steps) <= done:
                continue
            xb = as_unit_images(x[b * bs:(b + 1) * bs].to(device))
            if settings.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = y[b * bs:(b + 1) * bs].to(device)
            for j, a in enumerate(steps):
                step = b * len(steps) + j
                if step < done:
                    continue
                bar.set_postfix_str(a)
                if a == "clean":
                    with torch.no_grad():
                        logits = model(xb)
                    finite = torch.isfinite(logits).all(1)  # a NaN row is no prediction: wrong
                    out = (logits.argmax(1) == yb) & finite
                    if log is not None and not bool(finite.all()):
                        log(f"warning: {int((~finite).sum())} test points got NaN or infinite "
                            "logits; they count as misclassified")
                else:
                    out = _attack_batch(model, a, xb, yb, settings, g, notes)
                table[a][b * bs:b * bs + len(yb)] = out.cpu()
                save(step + 1)
                bar.update()
                quiet.step(step + 1, f"{a} on batch {b + 1}/{n_batches}")
    bar.close()
    if journal is not None:
        journal.unlink(missing_ok=True)
    if attacks:
        worst = table["clean"].clone()
        for a in attacks:
            worst &= table[a]
        table["worst"] = worst
    return table


def tail_mean(per_class: Sequence[float], frac: float = 0.3) -> float:
    """Mean over the ⌈frac·C⌉ classes with the lowest accuracy (RA-Tail-30 for frac = 0.3)."""
    vals = sorted(v for v in per_class if not math.isnan(v))
    k = max(1, math.ceil(frac * len(per_class)))
    return sum(vals[:k]) / len(vals[:k])


def metrics_from_table(table: dict[str, torch.Tensor], y: torch.Tensor,
                       classes: Sequence[str]) -> dict[str, Any]:
    """SA, RA per attack, per-class accuracy, worst class and RA-Tail-30 from the table."""
    y = y.cpu()
    counts = torch.bincount(y, minlength=len(classes)).double()

    def per_class(correct: torch.Tensor) -> list[float]:
        hits = torch.bincount(y, weights=correct.double(), minlength=len(classes))
        return [float(h / c) if c > 0 else float("nan") for h, c in zip(hits, counts)]

    robust = [k for k in table if k != "clean"]
    pc = {k: per_class(v) for k, v in table.items()}
    present = [i for i in range(len(classes)) if counts[i] > 0]
    return {
        "sa": float(table["clean"].double().mean()),
        "ra": {k: float(table[k].double().mean()) for k in robust},
        "per_class": pc,
        "worst_class": {k: min(pc[k][i] for i in present) for k in ["clean", *robust]},
        "tail30": {k: tail_mean([pc[k][i] for i in present]) for k in ["clean", *robust]},
        "classes": list(classes),
        "n": int(len(y)),
    }


def eps_sweep(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: EvalSettings,
              device: torch.device) -> tuple[dict[str, Any], int]:
    """PGD (the evaluator's steps, step ε/4) at the radii of checks.sweep_grid on (x, y);
    returns the sweep and how many predictions at ε = 0 differ from the clean pass."""
    grid = sweep_grid(settings.eps, settings.norm, x.shape[1:])
    clean: torch.Tensor | None = None
    ras, changed = [], 0
    for e in grid:
        s = dataclasses.replace(settings, eps=e, alpha=None, restarts=1, aa_budget=None)
        table = run_attacks(model, x, y, ["pgd"], s, device)
        if clean is None:  # ε = 0 comes first: compare example by example with the clean pass
            clean = table["clean"]
            changed = int((table["pgd"] != clean).sum())
        ras.append(float(table["pgd"].double().mean()))
    assert clean is not None
    return {"eps": grid, "ra_pgd": ras, "sa": float(clean.double().mean()), "n": int(len(y))}, changed


def evaluate(
    model: nn.Module,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    classes: Sequence[str],
    attacks: Sequence[str] = ("pgd",),
    settings: EvalSettings | None = None,
    n: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    checks: bool = False,
    check_n: int = 200,
    journal: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Evaluate ``model`` on (a stratified subset of) the test set; returns (metrics, table).
    ``x_test``: N×C×H×W uint8 pixels or floats in [0, 1] (what torchattacks and RobustBench
    take); anything else is refused with a clear error.

    With ``checks`` the sanity checks of dorat.evaluation.checks run too (the ε sweep on ``check_n``
    stratified points) and land in ``metrics["checks"]``. ``journal``: see run_attacks."""
    settings = settings or EvalSettings(eps=0.1)
    device = torch.device(device)
    x_test, y_test = as_examples(x_test, y_test, "the evaluation images")
    if int(y_test.max()) >= len(classes):
        raise ConfigError(f"the evaluation labels go up to {int(y_test.max())} but {len(classes)} "
                          "classes are named; give one name per class")
    check_fits(model, as_unit_images(x_test[:2]).to(device), len(classes), "the evaluation images")
    idx = stratified_subset(y_test, n, len(classes), settings.seed)
    x, y = x_test[idx], y_test[idx]
    notes: list[str] = []
    table = run_attacks(model, x, y, attacks, settings, device, progress, notes, journal, log)
    metrics = metrics_from_table(table, y, classes)
    metrics["settings"] = {
        "eps": settings.eps, "norm": settings.norm, "steps": settings.steps,
        "alpha": settings.step_size, "restarts": settings.restarts, "seed": settings.seed,
        "attacks": list(attacks),
        **({"aa_version": settings.aa_version} if "aa" in attacks else {}),
        **({"aa_budget": settings.aa_budget} if "aa" in attacks and settings.aa_budget else {}),
    }
    if notes:
        metrics["notes"] = [f"AutoAttack: {m}" for m in notes]
    if checks:
        found = table_checks(metrics)
        sub = stratified_subset(y, check_n, len(classes), settings.seed + 1, "eval.check_n")
        sweep, changed = eps_sweep(model, x[sub], y[sub], settings, device)
        metrics["checks"] = found + eps_sweep_checks(sweep, changed, len(classes))
        metrics["eps_sweep"] = sweep
    return metrics, table


def settings_from_config(cfg: Any) -> EvalSettings:
    """The evaluation settings of a resolved config (eval.eps and eval.norm default to the
    training threat model's)."""
    e = cfg.eval
    return EvalSettings(
        eps=cfg.attack.eps if e.eps is None else e.eps, norm=e.norm or cfg.attack.norm,
        steps=e.steps, alpha=e.alpha, restarts=e.restarts, batch_size=e.batch_size, seed=e.seed,
        aa_version=e.aa_version)


def eps_text(eps: float) -> str:
    """A radius as the reports print it: 0.03137 (8/255) when it is a whole number of 255ths,
    else the number (0.1)."""
    k = round(eps * 255)
    return f"{eps:.4g} ({k}/255)" if k and abs(eps * 255 - k) < 1e-6 else f"{eps:g}"


def summary_lines(m: dict[str, Any]) -> list[str]:
    """Human-readable summary: SA, RA per attack, worst class (with its name) and RA-Tail-30."""
    lines = [f"clean accuracy (SA)   {100 * m['sa']:6.2f}%   on {m['n']} test examples"]
    for k, v in m["ra"].items():
        pc = m["per_class"][k]
        worst_i = min(range(len(pc)), key=lambda i: (math.isnan(pc[i]), pc[i]))
        lines.append(
            f"RA-{k.upper():<6}             {100 * v:6.2f}%   worst class {100 * m['worst_class'][k]:6.2f}%"
            f" ({m['classes'][worst_i]}), RA-Tail-30 {100 * m['tail30'][k]:6.2f}%"
        )
    key = "worst" if "worst" in m["per_class"] else next(iter(m["ra"]), "clean")
    pcs = m["per_class"][key]
    lines.append(f"per-class accuracy ({key}):")
    for name, v in zip(m["classes"], pcs):
        bar = "#" * int(round(0 if math.isnan(v) else 30 * v))
        lines.append(f"  {name:>14} {100 * v:6.2f}% {bar}")
    if m.get("checks"):
        bad = [c["name"] for c in m["checks"] if not c["ok"]]
        lines.append(f"sanity checks: {len(m['checks']) - len(bad)}/{len(m['checks'])} passed"
                     + (f"; FAILED: {', '.join(bad)} (see the warnings and metrics 'checks')"
                        if bad else ""))
    lines.extend(f"note: {t}" for t in m.get("notes", []))
    return lines


class _CallableModule(types.ModuleType):
    """``dorat.evaluate`` is the main function, and the old path of this module (dorat.MOVED).
    Once the module is imported by its old path, Python binds the package attribute to the
    module, so the module itself calls the function: ``dorat.evaluate(model, x, y, ...)`` works
    in any order."""

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
