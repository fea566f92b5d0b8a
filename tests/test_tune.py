"""`dorat tune` on Optuna: two processes share one SQLite study, the median pruner stops a bad
trial after its first epoch, a stopped trial is resumed by the next process, and the best trial
comes out as a config `dorat train` takes. Tiny synthetic data; every score is on the
validation split."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_synthetic_npz, run_cli
from dorat.tune import surplus

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]


def _argv(npz: Path, out: Path, storage: str, *extra: str, epochs: int = 2) -> list[str]:
    return ["tune", "--dataset", f"npz:{npz}", "--method", "done", "--epochs", str(epochs),
            "--set", "batch_size=64", "--set", "attack.steps=2", "--set", "eval.steps=3",
            "--set", "eval.checks=false", "--set", "data.val_size=80", "--set", "val.n=80",
            "--set", "val.steps=2", "--storage", storage, "--study", "s", "--out", str(out), *extra]


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "dorat", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _study(storage: str) -> object:
    return optuna.load_study(study_name="s", storage=storage)


def test_two_processes_share_one_study(tmp_path: Path) -> None:
    npz = make_synthetic_npz(tmp_path / "toy.npz")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "tune"
    argv = _argv(npz, out, storage, "--space", "r=log:0.25:16", "--space", "optim.lr=0.01:0.1",
                 "--objective", "val.worst_class.pgd", "--constraint", "val.sa >= at.val.sa - 50",
                 "--trials", "4", "--pruner", "none")
    procs = [_spawn(argv) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
    study = _study(storage)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4  # the study's total: a trial another process runs counts towards it
    assert len({t.user_attrs["worker"] for t in done}) == 2, "both processes ran trials"
    for t in done:  # each trial: its own run, scored on validation, with per-epoch probes
        run = Path(t.user_attrs["run_dir"])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["eval"]["split"] == "val" and cfg["done"]["r"] == pytest.approx(t.params["done.r"])
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["split"] == "val"
        assert t.value == pytest.approx(100 * metrics["worst_class"]["pgd"])
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert all(0 <= r["val_worst_class_pgd"] <= 1 for r in log)
        ref = json.loads((out / "ref-at" / "metrics.json").read_text())
        assert t.constraints["c0"] == pytest.approx(100 * ref["sa"] - 50 - 100 * metrics["sa"])
    assert sum("reference run at" in err for _, err in results) == 2  # trained once, read once
    assert len(list((out / "ref-at").glob("log.jsonl"))) == 1
    # the best trial as a config for `dorat train`: the evaluation back on the test set
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["eval"]["split"] == "test" and best["val"]["every"] == 0
    assert best["done"]["r"] == pytest.approx(study.best_trial.params["done.r"])
    text = (out / "tune.md").read_text()
    assert f"Best feasible trial: **{study.best_trial.number}**" in text
    assert text.count("| complete |") == len(done)
    assert (out / "tune.png").stat().st_size > 5000
    # again: the study is complete, nothing more runs
    p = _spawn(argv)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "already has" in err
    assert len(_study(storage).trials) == len(study.trials)
    # another objective on the same study: refused
    p = _spawn([*argv[:-6], "--objective", "val.sa", "--trials", "4", "--pruner", "none"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 2 and "was started with other settings" in err, err


def test_median_pruner_stops_a_bad_trial(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    npz = make_synthetic_npz(tmp_path / "toy.npz")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    for lr in (0.05, 0.05, 1e-5):  # the third cannot learn in an epoch: the pruner must stop it
        study.enqueue_trial({"optim.lr": lr})
    code, out, err = run_cli(capsys, *_argv(npz, tmp_path / "tune", storage, "--space",
                                            "optim.lr=log:1e-5:0.1", "--objective", "val.sa",
                                            "--trials", "3", "--prune-startup", "2", epochs=3))
    assert code == 0, err
    trials = _study(storage).trials
    state = optuna.trial.TrialState
    assert [t.state for t in trials] == [state.COMPLETE, state.COMPLETE, state.PRUNED]
    bad = trials[2]
    assert list(bad.intermediate_values) == [1]
    log = (Path(bad.user_attrs["run_dir"]) / "log.jsonl").read_text().splitlines()
    assert len(log) == 1 and not (Path(bad.user_attrs["run_dir"]) / "metrics.json").exists()
    assert "| pruned |" in (tmp_path / "tune" / "tune.md").read_text()


def test_stopped_trial_resumes_in_the_next_process(tmp_path: Path) -> None:
    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=1500)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    out = tmp_path / "tune"
    argv = _argv(npz, out, storage, "--space", "r=log:0.25:16", "--objective", "val.ra.pgd",
                 "--trials", "1", epochs=3)
    p = _spawn(argv)
    log = out / "trials" / "0000" / "log.jsonl"
    deadline = time.time() + 300
    ckpt = log.parent / "checkpoint.safetensors"  # written after the epoch's log line
    while not (ckpt.is_file() and log.read_text().count("\n") >= 1):
        assert time.time() < deadline and p.poll() is None, p.communicate()[1]
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert "resumes it from" in err
    first = _study(storage).trials
    assert first[0].state == optuna.trial.TrialState.FAIL
    assert first[1].state == optuna.trial.TrialState.WAITING
    p = _spawn(argv)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    assert "resuming" in err and "after epoch" in err
    trials = _study(storage).trials
    assert trials[1].state == optuna.trial.TrialState.COMPLETE
    assert trials[1].params == trials[0].params
    assert trials[1].user_attrs["run_dir"] == str(out / "trials" / "0000")
    epochs = [json.loads(line)["epoch"] for line in log.read_text().splitlines()]
    assert epochs == [1, 2, 3]


def test_a_study_whose_trials_all_fail_stops(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Failed trials do not count towards --trials: three in a row end the process with one line
    instead of failing forever."""
    npz = make_synthetic_npz(tmp_path / "toy.npz")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    code, _, err = run_cli(capsys, *_argv(npz, tmp_path / "tune", storage, "--space", "data.val_size=int:1:3",
                                          "--objective", "val.sa", "--trials", "5"))
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dorat: error: 3 trials in a row failed") and "data.val_size" in last, last
    assert [t.state for t in _study(storage).trials] == [optuna.trial.TrialState.FAIL] * 3
    assert (tmp_path / "tune" / "tune.md").is_file()  # the table says what happened


def test_two_trials_started_at_once_past_the_limit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The race behind the check after each trial: with N - 1 finished, two processes end a trial
    at the same moment, both see N - 1 and both start one. The later-numbered trial must fail
    unrun (no training, no run directory, not in the report) and its process stop, so the study
    ends with exactly N. Here the other process's trial is a RUNNING trial this test asked for."""
    npz = make_synthetic_npz(tmp_path / "toy.npz")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    dist = {"optim.lr": optuna.distributions.FloatDistribution(0.01, 0.1)}
    for v in (10.0, 20.0, 30.0):  # pruned: finished, and no run directory to read a best config from
        study.add_trial(optuna.trial.create_trial(params={"optim.lr": 0.05}, distributions=dist,
                                                  state=optuna.trial.TrialState.PRUNED,
                                                  intermediate_values={1: v}))
    elsewhere = study.ask()  # the 4th trial, running in another process
    assert surplus(elsewhere, 4) is None and surplus(elsewhere, 3) == 3
    code, _, err = run_cli(capsys, *_argv(npz, tmp_path / "tune", storage, "--space", "optim.lr=0.01:0.1",
                                          "--objective", "val.sa", "--trials", "4", "--pruner", "none"))
    assert code == 0, err
    trials = _study(storage).trials
    state = optuna.trial.TrialState
    assert [t.state for t in trials] == [state.PRUNED] * 3 + [state.RUNNING, state.FAIL]
    extra = trials[4]
    assert extra.user_attrs == {"surplus": True} and extra.params == {}
    assert "[trial 4] not run: 4 trials are finished or running (--trials 4)" in err
    assert "Traceback" not in err and "Surplus" not in err  # Optuna's failure warning is muted
    assert not (tmp_path / "tune" / "trials").exists()
    assert "4 trials: 3 pruned, 1 running." in (tmp_path / "tune" / "tune.md").read_text()
    # the trial elsewhere fails: the limit is no longer reached, the next trial is within it
    study.tell(elsewhere, state=state.FAIL)
    nxt = study.ask()
    assert surplus(nxt, 4) is None


def test_a_seeded_study_proposes_the_same_values_whichever_process_asks(tmp_path: Path) -> None:
    """Two processes on one seeded study (two Study objects on one SQLite storage, asking in
    turn) propose what one process asking alone proposes, and never the same values twice:
    one TPESampler(seed) per process replays one random stream in both."""
    from dorat.tune.sampler import TrialSeededTPE

    def ask(storages: list[str], n: int) -> list[float]:
        studies = [optuna.create_study(storage=url, study_name="s", sampler=TrialSeededTPE(7),
                                       load_if_exists=True) for url in storages]
        values = []
        for i in range(n):
            t = studies[i % len(studies)].ask()
            values.append(t.suggest_float("lr", 0.01, 1.0, log=True))
            t.study.tell(t, values[-1])
        return values

    one = ask([f"sqlite:///{tmp_path / 'one.db'}"], 6)
    two = ask([f"sqlite:///{tmp_path / 'two.db'}"] * 2, 6)
    assert one == two
    assert len(set(two)) == 6
    other = ask([f"sqlite:///{tmp_path / 'other.db'}"], 6)  # same seed, fresh study: same values
    assert other == one


def test_a_process_with_another_base_config_cannot_join_the_study(tmp_path: Path) -> None:
    """The study records the whole resolved base config (but where the process runs) and the
    pruner and sampler settings: a second process with other --epochs, another --set value or
    another pruner is refused before it trains, instead of being ranked with the first."""
    from dorat import config as cfglib
    from dorat.errors import ConfigError
    from dorat.tune import Tuner, create_study, parse_metric, parse_space

    url = f"sqlite:///{tmp_path / 'tune.db'}"

    def join(sets: dict, pruner: str = "median", seed: int = 0) -> object:
        base = cfglib.resolve(None, {"dataset": "fashion-mnist", "method": "done"}, None,
                              {"eval.split": "val", "data.val_size": 100, **sets})
        tuner = Tuner(base, [parse_space("r=0.1:1", base)], parse_metric("val.ra.pgd", ["pgd"], "o"), [],
                      tmp_path)
        return create_study(tuner, url, "s", pruner, 2, 0, seed)

    join({"epochs": 2})
    join({"epochs": 2, "done.r": 0.5})  # the searched key may differ: trials set it
    join({"epochs": 2, "device": "cpu", "data.dir": "/elsewhere"})  # where it runs: may differ
    for sets, other, needle in [({"epochs": 3}, {}, "epochs: 2 there, 3 here"),
                                ({"epochs": 2, "attack.steps": 3}, {}, "attack.steps: 10 there, 3 here"),
                                ({"epochs": 2}, {"pruner": "none"}, "pruner"),
                                ({"epochs": 2}, {"seed": 1}, "sampler_seed: 0 there, 1 here")]:
        with pytest.raises(ConfigError, match="was started with other settings") as e:
            join(sets, **other)
        assert needle in str(e.value), str(e.value)
