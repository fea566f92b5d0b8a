"""A compare grid with a tuning step (dorat.compare.tuning): every method tuned with one budget
on the validation split, then the chosen values trained; FAAL fine-tuning the grid's own PGD-AT
run (init_from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dorat.compare import compare, load_grid
from dorat.errors import ConfigError

pytest.importorskip("optuna")


def _file(tmp_path: Path, npz: Path, **extra: object) -> Path:
    spec = {
        "title": "tuned",
        "set": {"dataset": f"npz:{npz}", "epochs": 2, "batch_size": 64, "attack.steps": 1,
                "data.val_size": 40, "val.n": 40, "val.steps": 1, "eval.steps": 2,
                "eval.checks": False, "log.progress": "off"},
        "tune": {"trials": 2, "epochs": 1, "seed": 0, "objective": "val.ra.pgd",
                 "space": {"optim.lr": "log:0.01:0.1", "optim.ema": "0,0.9"}, "pruner": "none"},
        "methods": [{"name": "at", "method": "at"},
                    {"name": "trades", "method": "trades", "space": {"trades.beta": "1:8"}},
                    {"name": "faal", "method": "faal", "init_from": "at",
                     "set": {"optim.milestones": [0.5]}}],
        "seeds": [0],
        **extra,
    }
    f = tmp_path / "grid.yaml"
    f.write_text(yaml.safe_dump(spec))
    return f


def test_a_tuned_grid_runs_end_to_end_with_one_budget_for_every_method(tmp_path: Path) -> None:
    from conftest import make_synthetic_npz

    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=200, n_test=40)
    f, out = _file(tmp_path, npz), tmp_path / "out"
    grid = load_grid(f, out)
    assert all(r.waiting for r in grid.runs) and len(grid.studies) == 3  # nothing chosen yet
    logs: list[str] = []
    compare(f, out, log=logs.append)
    budgets = []
    for name in ("at", "trades", "faal"):
        chosen = json.loads(next(out.glob(f"tune/*/default/{name}/chosen.json")).read_text())
        budgets.append(chosen["budget"])
        assert chosen["finished_trials"] == 2  # the same number of trials for every method
        assert set(chosen["params"]) >= {"optim.lr", "optim.ema"}
        trials = sorted(next(out.glob(f"tune/*/default/{name}")).joinpath("trials").iterdir())
        assert len(trials) == 2
        for t in trials:  # trials are shorter and scored on the validation split only
            cfg = yaml.safe_load((t / "config.yaml").read_text())
            assert cfg["epochs"] == 1 and cfg["eval"]["split"] == "val"
    assert budgets[0] == budgets[1] == budgets[2]  # one budget, asserted from what each recorded
    trades = json.loads(next(out.glob("tune/*/default/trades/chosen.json")).read_text())
    assert "trades.beta" in trades["params"]
    grid = load_grid(f, out)
    for r in grid.runs:  # the chosen values are what the grid trained
        saved = yaml.safe_load((r.path / "config.yaml").read_text())
        assert saved["optim"]["lr"] == pytest.approx(r.chosen["optim.lr"]) and saved["epochs"] == 2
        assert (r.path / "metrics.json").is_file()
    faal = next(r for r in grid.runs if r.name == "faal")
    assert json.loads((faal.path / "init.json").read_text())["file"] == str(
        (next(r for r in grid.runs if r.name == "at").path / "model.safetensors").resolve())
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert all(row["tuned"] == next(r.chosen for r in grid.runs if r.name == row["method"]) for row in rows)
    tuning = json.loads((out / "tuning.json").read_text())
    assert [m["method"] for m in tuning["methods"]] == ["at", "trades", "faal"]
    assert "| at |" in (out / "tuning.md").read_text()
    # a second call changes nothing: every study and run is done
    logs.clear()
    compare(f, out, log=logs.append)
    assert not any("[trial" in m for m in logs) and not any("training" in m for m in logs)


def test_the_budget_is_fixed_once_tuning_began(tmp_path: Path) -> None:
    from conftest import make_synthetic_npz

    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=200, n_test=40)
    f, out = _file(tmp_path, npz), tmp_path / "out"
    grid = load_grid(f, out)
    chosen_path = grid.studies[0].path / "chosen.json"
    chosen_path.parent.mkdir(parents=True)
    chosen_path.write_text(json.dumps({"params": {"optim.lr": 0.05, "optim.ema": 0.0},
                                       "space": {"optim.lr": "log:0.01:0.1", "optim.ema": "0,0.9"},
                                       "budget": {**grid.tune.budget(), "trials": 3}}))
    with pytest.raises(ConfigError, match="tuned with another budget"):
        load_grid(f, out)
    spec = yaml.safe_load(f.read_text())
    spec["methods"][1].pop("space")
    spec.pop("tune")
    spec["methods"][1]["space"] = {"trades.beta": "1:8"}
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="has a space but the file has no tune block"):
        load_grid(f, out)
    spec["methods"][1].pop("space")
    spec["methods"][2]["init_from"] = "nope"
    f.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="init_from must name another method"):
        load_grid(f, out)
