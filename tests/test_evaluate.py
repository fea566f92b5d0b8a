"""Metrics from the per-example table; evaluation sanity on a trained model of real data."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import needs_fmnist
from dorat import config as C
from dorat.evaluation.evaluate import EvalSettings, evaluate, metrics_from_table, stratified_subset, tail_mean
from dorat.runs.run import prepare, train


def test_metrics_from_table_by_hand() -> None:
    y = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    clean = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    pgd = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    cw = torch.tensor([1, 1, 0, 0, 1, 0, 0, 1], dtype=torch.bool)
    table = {"clean": clean, "pgd": pgd, "cw": cw, "worst": clean & pgd & cw}
    m = metrics_from_table(table, y, ["a", "b", "c", "d"])
    assert m["sa"] == 7 / 8 and m["ra"]["pgd"] == 4 / 8 and m["ra"]["worst"] == 3 / 8
    assert m["per_class"]["pgd"] == [0.5, 0.0, 2 / 3, 1.0]
    assert m["per_class"]["worst"] == [0.5, 0.0, 1 / 3, 1.0]
    assert m["worst_class"]["pgd"] == 0.0
    # ceil(0.3 * 4) = 2 lowest classes
    assert m["tail30"]["pgd"] == pytest.approx((0.0 + 0.5) / 2)
    assert m["tail30"]["worst"] == pytest.approx((0.0 + 1 / 3) / 2)
    assert m["n"] == 8 and m["classes"] == ["a", "b", "c", "d"]


def test_tail_mean_counts_ceil_30_percent() -> None:
    assert tail_mean([0.9, 0.1, 0.5, 0.3, 0.8, 0.7, 0.2, 0.6, 0.4, 1.0]) == pytest.approx(0.2)
    assert tail_mean([0.5, 0.2, 0.9]) == pytest.approx(0.2)  # ceil(0.9) = 1 class


def test_stratified_subset_counts() -> None:
    y = torch.arange(10).repeat_interleave(50)
    idx = stratified_subset(y, 100, 10, seed=0)
    assert torch.bincount(y[idx], minlength=10).tolist() == [10] * 10
    assert torch.equal(idx, stratified_subset(y, 100, 10, seed=0))
    assert not torch.equal(idx, stratified_subset(y, 100, 10, seed=1))


@pytest.fixture(scope="module")
def trained_fmnist(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A small-cnn adversarially trained for a short while on real Fashion-MNIST."""
    out = tmp_path_factory.mktemp("fm") / "run"
    cfg = C.resolve("fmnist-demo", {}, ["epochs=2", "data.train_subset=6000", "eval.n=500",
                                        "attack.steps=3", "attack.alpha=0.04",
                                        "eval.checks=false"])  # the tests here run their own
    untrained = prepare(cfg)
    settings = EvalSettings(eps=0.1, steps=10, batch_size=500)
    m0, _ = evaluate(untrained.model, untrained.data.x_test, untrained.data.y_test,
                     untrained.data.classes, ["pgd"], settings, n=500)
    metrics = train(cfg, out, log=lambda s: None)
    run = prepare(C.from_dict(C.load_yaml(str(out / "config.yaml"))[0], "saved"))
    from dorat.files.checkpoint import load_weights

    load_weights(out / "model.safetensors", run.model)
    return run, metrics, m0, out


@needs_fmnist
def test_short_training_on_real_fmnist_beats_untrained(trained_fmnist) -> None:  # noqa: ANN001
    run, metrics, m0, out = trained_fmnist
    assert metrics["ra"]["pgd"] > m0["ra"]["pgd"] + 0.3, (metrics["ra"], m0["ra"])
    assert metrics["sa"] > 0.6
    assert set(metrics) >= {"sa", "ra", "per_class", "worst_class", "tail30", "classes", "n"}
    assert len(metrics["per_class"]["pgd"]) == 10 and metrics["n"] == 500
    assert metrics["worst_class"]["pgd"] <= metrics["tail30"]["pgd"] <= metrics["ra"]["pgd"]
    log = [line for line in (out / "log.jsonl").read_text().splitlines() if line]
    assert len(log) == 2


@needs_fmnist
def test_robust_accuracy_falls_with_eps_and_equals_clean_at_zero(trained_fmnist) -> None:  # noqa: ANN001
    run, *_ = trained_fmnist
    ras = []
    for eps in [0.0, 0.05, 0.1, 0.2, 0.4]:
        m, table = evaluate(run.model, run.data.x_test, run.data.y_test, run.data.classes, ["pgd"],
                            EvalSettings(eps=eps, steps=10, seed=0), n=300)
        if eps == 0:
            assert m["ra"]["pgd"] == m["sa"]
            assert torch.equal(table["pgd"], table["clean"])
        ras.append(m["ra"]["pgd"])
    assert all(a >= b for a, b in zip(ras, ras[1:])), ras
    assert ras[-1] < 0.05, ras  # eps = 0.4 on [0, 1] images breaks nearly everything


@needs_fmnist
def test_cw_and_worst_case_table(trained_fmnist) -> None:  # noqa: ANN001
    run, *_ = trained_fmnist
    m, t = evaluate(run.model, run.data.x_test, run.data.y_test, run.data.classes, ["pgd", "cw"],
                    EvalSettings(eps=0.1, steps=10), n=200)
    assert torch.equal(t["worst"], t["clean"] & t["pgd"] & t["cw"])
    assert m["ra"]["worst"] <= min(m["ra"]["pgd"], m["ra"]["cw"])
    assert not math.isnan(m["tail30"]["cw"])


def test_restarts_never_raise_accuracy(tmp_path: Path, synthetic_npz: Path) -> None:
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}"}, ["epochs=1"])
    run = prepare(cfg)
    one, _ = evaluate(run.model, run.data.x_test, run.data.y_test, run.data.classes, ["pgd"],
                      EvalSettings(eps=0.05, steps=3, restarts=1))
    three, _ = evaluate(run.model, run.data.x_test, run.data.y_test, run.data.classes, ["pgd"],
                        EvalSettings(eps=0.05, steps=3, restarts=3))
    assert three["ra"]["pgd"] <= one["ra"]["pgd"]


@needs_fmnist
def test_interrupted_evaluation_resumes_bitwise(trained_fmnist, tmp_path: Path,  # noqa: ANN001
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation killed mid-way resumes from its journal after the last finished (batch,
    attack) step and gives the table an uninterrupted evaluation gives; a journal of other
    settings is ignored, and the journal is gone once the table is complete."""
    import dataclasses
    import shutil

    import dorat.evaluation.evaluate as E

    run, *_ = trained_fmnist
    idx = stratified_subset(run.data.y_test, 200, 10, seed=0)
    x, y = run.data.x_test[idx], run.data.y_test[idx]
    s = EvalSettings(eps=0.1, steps=3, batch_size=64,
                     aa_budget={"iters": 3, "queries": 20, "targets": 2})
    attacks, cpu = ["pgd", "cw", "aa"], torch.device("cpu")
    full = E.run_attacks(run.model, x, y, attacks, s, cpu)
    # the test can tell: PGD's random starts (the generator the journal saves) change the table
    other_seed = E.run_attacks(run.model, x, y, ["pgd"], dataclasses.replace(s, seed=1), cpu)
    assert not torch.equal(other_seed["pgd"], full["pgd"])

    real, calls = E._attack_batch, []

    def attack(*a, fail_at: int | None = None, **k):  # noqa: ANN002, ANN003, ANN202
        if len(calls) == fail_at:
            raise RuntimeError("killed")
        calls.append(a[1])
        return real(*a, **k)

    journal = tmp_path / ".eval.partial.safetensors"
    monkeypatch.setattr(E, "_attack_batch", lambda *a, **k: attack(*a, fail_at=5, **k))
    with pytest.raises(RuntimeError, match="killed"):
        E.run_attacks(run.model, x, y, attacks, s, cpu, journal=journal)
    assert journal.is_file() and calls == ["pgd", "cw", "aa", "pgd", "cw"]

    # other settings: the journal is not theirs, everything runs (4 batches x 3 attacks)
    calls.clear()
    monkeypatch.setattr(E, "_attack_batch", attack)
    shutil.copy(journal, tmp_path / "copy.safetensors")
    E.run_attacks(run.model, x, y, attacks, dataclasses.replace(s, steps=4), cpu,
                  journal=tmp_path / "copy.safetensors")
    assert len(calls) == 12 and not (tmp_path / "copy.safetensors").exists()

    calls.clear()
    msgs: list[str] = []
    resumed = E.run_attacks(run.model, x, y, attacks, s, cpu, journal=journal, log=msgs.append)
    assert calls == ["aa"] + ["pgd", "cw", "aa"] * 2  # batch 1's AutoAttack, then batches 2-3
    assert "after 7 of 16" in msgs[0]
    assert set(resumed) == set(full)
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    assert not journal.exists()


def test_an_evaluation_without_a_progress_bar_logs_its_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where stderr is no terminal (a log file, a Slurm job) the evaluation says where it is, at
    most once a minute (here: every step), with its rate and the time left; with a bar, nothing."""
    import functools

    import torch.nn as nn

    from dorat.evaluation import evaluate as ev

    monkeypatch.setattr(ev, "_Heartbeat", functools.partial(ev._Heartbeat, every=0.0))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    x, y = torch.rand(40, 1, 8, 8), torch.arange(40) % 4
    lines: list[str] = []
    ev.run_attacks(model, x, y, ["pgd"], EvalSettings(eps=0.1, steps=2, batch_size=20),
                   torch.device("cpu"), progress=False, log=lines.append)
    assert len(lines) == 4 and lines[-1].startswith("eval: 4/4 (batch, attack) steps (pgd on batch 2/2 done)")
    assert all("a minute, about" in s for s in lines)
    lines.clear()
    ev.run_attacks(model, x, y, ["pgd"], EvalSettings(eps=0.1, steps=2, batch_size=20),
                   torch.device("cpu"), progress=True, log=lines.append)
    assert lines == []
