"""The shape of the code and its seams: typed parts, presets as data, plug-ins from outside the
package (CLI, eval in a new process, compare workers, entry points), the Python API from the
user's own objects. The module rules are tests/test_layers.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from dorat import config as C
from dorat.compare import load_grid
from dorat.errors import ConfigError
from dorat.evaluation.evaluate import EvalSettings, evaluate
from dorat.objectives import build_method

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dorat"
EXAMPLES = ROOT / "examples"
TINY = ["--epochs", "1", "--set", "batch_size=64", "--set", "attack.steps=2", "--set", "eval.n=40",
        "--set", "eval.steps=3", "--set", "eval.check_n=20"]


def test_example_plugin_is_one_short_file() -> None:
    assert len((EXAMPLES / "inverse_class_accuracy.py").read_text().splitlines()) <= 60


# -- typed parts, presets as data ------------------------------------------------------------

def test_a_preset_is_its_composition() -> None:
    preset = C.resolve(None, {"method": "done"})
    composed = C.resolve(None, sets=["method.attack=pgd", "method.loss=ce", "method.weighting=kl-dro",
                                     "optim.grad_clip=5"])
    assert composed.method.name == "pgd×ce×kl-dro" and preset.method.name == "done"
    a, b = preset.flat(), composed.flat()
    assert {k for k in a if a[k] != b[k]} == {"method.name"}
    assert build_method(preset).describe() == build_method(composed).describe() == {
        "attack": "pgd", "loss": "ce", "weighting": "kl-dro"}
    # the parts' fields are their sections, typed and checked once
    assert C.resolve(None, sets=["done.r=2"]).done.r == 2.0
    with pytest.raises(ConfigError, match="done.r' must be > 0"):
        C.resolve(None, sets=["done.r=-1"])
    with pytest.raises(AttributeError, match="frozen"):
        preset.attack.eps = 0.3  # type: ignore[misc]


def test_old_keys_read_as_their_new_names() -> None:
    cfg = C.resolve(None, {"method": "done"}, ["done.lower=barrier-adam", "done.cg_iters=3",
                                               "done.barrier_c=0.001", "gairat.burn_in=0.25",
                                               "done.warmup_epochs=2"])
    assert (cfg.method.attack, cfg.hypergrad.cg_iters, cfg.barrier.c) == ("barrier-adam", 3, 0.001)
    assert cfg.gairat.warmup == "25%" and cfg.done.warmup == 2


def test_cross_key_checks_run_at_resolve() -> None:
    with pytest.raises(ConfigError, match="attack.norm=linf"):
        C.resolve(None, {"method": "done-cid"}, ["attack.norm=l2"])


def test_relative_npz_path_is_stored_absolute(tmp_path: Path, synthetic_npz: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(synthetic_npz.parent)
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz.name}", "data.dir": "."})
    assert cfg.dataset == f"npz:{synthetic_npz.resolve()}" and cfg.data.dir == str(tmp_path.resolve())


# -- plug-ins --------------------------------------------------------------------------------

def _env(*paths: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")])
    return env


def _dorat(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dorat", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_plugin_weighting_trains_from_the_cli_and_reopens_in_a_new_process(
        tmp_path: Path, synthetic_npz: Path) -> None:
    env = _env(EXAMPLES)
    run = tmp_path / "run"
    r = _dorat(["train", "--plugin", "inverse_class_accuracy", "--method", "at-inv-acc", "--dataset",
                f"npz:{synthetic_npz}", "--out", str(run), *TINY, "--epochs", "2",
                "--set", "inv-class-acc.momentum=0.5"], env)
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(log[-1]["class_acc"]) == 4 and 0 < log[-1]["ess"] < 1  # it really reweighted
    saved = C.load_yaml(str(run / "config.yaml"))[0]
    assert saved["plugins"] == ["inverse_class_accuracy"]
    assert saved["method"]["weighting"] == "inv-class-acc" and saved["inv-class-acc"]["momentum"] == 0.5
    # a new process, another directory, no --plugin: the run names its plug-in
    r = _dorat(["eval", str(run), "--out", str(tmp_path / "e.json")], env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["method"] == "at-inv-acc"
    r = _dorat(["train", "--plugin", "inverse_class_accuracy", "--list-keys"], env)
    assert "inv-class-acc.floor: float = 0.05" in r.stdout
    r = _dorat(["train", "--plugin", "inverse_class_accuracy", "--set", "method.weighting=nope",
                "--out", str(tmp_path / "bad")], env)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "unknown weighting 'nope'" in r.stderr and "inv-class-acc" in r.stderr
    assert not (tmp_path / "bad").exists()


def test_plugin_from_an_entry_point(tmp_path: Path) -> None:
    dist = tmp_path / "myplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dorat.parts]\ninv = inverse_class_accuracy\n")
    r = _dorat(["train", "--list-keys"], _env(tmp_path, EXAMPLES))
    assert r.returncode == 0, r.stderr
    assert "inv-class-acc.momentum: float = 0.9" in r.stdout


def test_compare_workers_see_plugins(tmp_path: Path, synthetic_npz: Path) -> None:
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
base: null
set: {{dataset: "npz:{synthetic_npz}", epochs: 1, batch_size: 64, attack.steps: 2, eval.n: 40,
      eval.steps: 3, eval.checks: false}}
methods: [at, at-inv-acc]
seeds: [0]
""")
    r = _dorat(["compare", str(grid), "--out", str(tmp_path / "out"), "--workers", "2",
                "--plugin", "inverse_class_accuracy"], _env(EXAMPLES))
    assert r.returncode == 0, r.stderr
    agg = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(row["method"] for row in agg["rows"] if row["seeds"] == [0]) == ["at", "at-inv-acc"]


# -- the Python API from the user's objects --------------------------------------------------

MODEL_SRC = '''
import torch.nn as nn

class TinyNet(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 4))
'''


def _toy(synthetic_npz: Path) -> tuple[torch.Tensor, ...]:
    with np.load(synthetic_npz) as f:
        x = torch.from_numpy(f["x_train"]).float().div(255)[:, None]
        return x, torch.from_numpy(f["y_train"]), torch.from_numpy(f["x_test"])[:, None], \
            torch.from_numpy(f["y_test"])


def test_fit_takes_tensors_datasets_and_loaders_and_the_run_reopens(
        tmp_path: Path, synthetic_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mynets.py").write_text(MODEL_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynets

    x, y, xt, yt = _toy(synthetic_npz)  # float train images in [0, 1], uint8 test images
    kw = {"method": "done", "epochs": 2, "batch_size": 64, "attack__steps": 2, "eval__n": 40,
          "eval__checks": False, "log": lambda s: None}
    torch.manual_seed(0)
    import dorat.runs.run

    reads: list[str] = []
    real_load = dorat.runs.run.load_dataset
    monkeypatch.setattr(dorat.runs.run, "load_dataset",
                        lambda *a, **k: reads.append(a[0]) or real_load(*a, **k))
    a = dorat.fit(mynets.TinyNet(), (x, y), (xt, yt), out=tmp_path / "a", **kw)
    assert not reads  # fit writes RUN/data.npz for later processes and never reads it back
    assert a.config.model == "mynets:TinyNet" and a.metrics["sa"] > 0.5
    ds = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    b = dorat.fit(mynets.TinyNet(), ds, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xt, yt),
                  batch_size=7), out=tmp_path / "b", **kw)
    assert a.metrics["sa"] == b.metrics["sa"] and a.metrics["ra"] == b.metrics["ra"]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)
    r = _dorat(["eval", str(tmp_path / "a"), "--n", "40", "--out", str(tmp_path / "e.json")],
               _env(tmp_path), cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["sa"] == a.metrics["sa"]
    held = dorat.fit(mynets.TinyNet(), (x, y), out=tmp_path / "c", **kw)  # no test set: 10% held out
    assert held.metrics["n"] == 40 and len(np.load(tmp_path / "c" / "data.npz")["y_test"]) == 48


def test_evaluate_takes_uint8_or_unit_floats_and_refuses_anything_else(synthetic_npz: Path) -> None:
    _, _, xt, yt = _toy(synthetic_npz)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 4))
    s = EvalSettings(eps=0.1, steps=3)
    m8, _ = evaluate(model, xt, yt, list("abcd"), ["pgd"], s)
    mf, _ = evaluate(model, xt.float() / 255, yt, list("abcd"), ["pgd"], s)
    assert m8["sa"] == mf["sa"] and m8["ra"] == mf["ra"]
    with pytest.raises(ConfigError, match=r"floats in \[0, 255\], outside \[0, 1\]"):
        evaluate(model, xt.float(), yt, list("abcd"), ["pgd"], s)
    with pytest.raises(ConfigError, match="dtype torch.int16"):
        evaluate(model, xt.to(torch.int16), yt, list("abcd"), ["pgd"], s)


def test_the_committed_results_grid_is_still_recognised_as_finished() -> None:
    """Run directories written before the redesign (old keys: done.lower in every config,
    burn_in fractions) read as the same runs: nothing is retrained."""
    from dorat.compare.grid import _validate

    for spec, out in (("fmnist.yaml", "grid"), ("fmnist-longtail-sweep.yaml", "sweep-longtail")):
        grid = load_grid(ROOT / "benchmarks" / "results" / spec, ROOT / "benchmarks" / "results" / out)
        statuses = _validate(grid, None)
        finished = [st for r, st in zip(grid.runs, statuses) if (r.path / "metrics.json").is_file()
                    and all((r.path / f"eval-{e['name']}.json").is_file() for e in grid.evals)]
        assert len(finished) >= 20 and set(finished) == {"done"}, spec  # (the grid grows)
    trades = C.from_dict(C.load_yaml(str(ROOT / "benchmarks/results/grid/runs/fashion-mnist/balanced/"
                                         "trades/seed0/config.yaml"))[0], "saved")
    assert trades.method.attack == "pgd-kl"  # the old `done.lower: pgd` acted in DONE presets only
