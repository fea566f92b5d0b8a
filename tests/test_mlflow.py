"""MLflow tracking (log.mlflow): one MLflow run per dorat run, read back with MLflow's own
client from a local SQLite store: the config as parameters, each epoch's numbers with the epoch
as step (the validation probe's too), the final numbers, the artifacts; a resume continues the
same MLflow run with each epoch once; compare and tune tag their runs; a store that does not
answer is one line before anything is written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from dorat import config as C
from dorat.runs import read_config, train
from dorat.training.tracking import SYNCED, epoch_scalars, final_scalars

pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

TINY = ["--set", "attack.steps=1", "--set", "eval.n=40", "--set", "eval.checks=false"]


def _client(store: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite store with MLflow's tables, made once: creating them takes seconds."""
    d = tmp_path_factory.mktemp("mlflow-template")
    _client(d).search_experiments()
    return d / "mlflow.db"


@pytest.fixture
def store(empty_store: Path, tmp_path: Path) -> Path:
    """A fresh local store (a directory, as ``log.mlflow_uri`` takes it) for one test."""
    d = tmp_path / "store"
    d.mkdir()
    shutil.copyfile(empty_store, d / "mlflow.db")
    return d


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_an_mlflow_run_holds_the_config_every_epoch_the_final_numbers_and_the_report(
        synthetic_npz: Path, tmp_path: Path, store: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--method", "done",
                           "--epochs", "2", "--out", str(run), "--log", "mlflow",
                           "--set", f"log.mlflow_uri={store}", "--set", "log.mlflow_tags=team=robust",
                           "--set", "val.every=1", "--set", "data.val_size=64", "--set", "val.n=32",
                           "--set", "done.warmup=0", *TINY)
    assert code == 0, err
    ids = json.loads((run / "mlflow.json").read_text())
    client = _client(store)
    got = client.get_run(ids["run_id"])
    assert got.info.status == "FINISHED"
    assert client.get_experiment(got.info.experiment_id).name == "dorat"
    cfg = read_config(run)
    assert got.data.params == {k: str(v) for k, v in cfg.flat().items()}
    tags = got.data.tags
    assert tags["dorat.run_dir"] == str(run.resolve()) and tags["dorat.method"] == "done"
    assert tags["team"] == "robust" and tags[SYNCED] == "2"
    log = _log(run)
    classes = [str(c) for c in range(4)]
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in log:
        for tag, v in epoch_scalars(record, classes):
            expected.setdefault(tag, []).append((record["epoch"], v))
    assert {"train/loss", "train/ess", "val/ra_pgd", "val/worst_class_pgd", "weights/class_mean/3"} \
        <= set(expected)
    for tag, points in expected.items():  # every number of every epoch, once, at its epoch
        history = sorted((m.step, m.value) for m in client.get_metric_history(ids["run_id"], tag))
        assert [s for s, _ in history] == [s for s, _ in points], tag
        assert [v for _, v in history] == pytest.approx([v for _, v in points], rel=1e-9), tag
    metrics = json.loads((run / "metrics.json").read_text())
    final = dict(final_scalars(metrics, classes))
    assert {"final/sa", "final/ra/pgd", "final/worst_class/pgd", "final/per_class/pgd/3"} <= set(final)
    for tag, v in final.items():
        history = client.get_metric_history(ids["run_id"], tag)
        assert [(m.step, m.value) for m in history] == [(2, pytest.approx(v))], tag
    assert final["final/per_class/pgd/0"] == pytest.approx(metrics["per_class"]["pgd"][0])
    top = {a.path for a in client.list_artifacts(ids["run_id"])}
    assert {"metrics.json", "config.yaml", "log.jsonl", "report"} <= top
    report = {a.path for a in client.list_artifacts(ids["run_id"], "report")}
    assert {"report/report.md", "report/per_class.png", "report/training.png"} <= report
    local = Path(client.download_artifacts(ids["run_id"], "metrics.json", str(tmp_path)))
    assert json.loads(local.read_text()) == metrics


def test_a_resume_continues_the_same_mlflow_run_with_each_epoch_once(synthetic_npz: Path,
                                                                    tmp_path: Path, store: Path) -> None:
    """Epoch 1 is sent, epoch 2 is trained while MLflow is off (as if a crash lost it after its
    checkpoint), epoch 3 with MLflow on again: the resumed MLflow run gets epoch 2 from
    log.jsonl, then epoch 3, each once."""
    out = tmp_path / "run"
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 3},
                    ["attack.steps=1", "eval.n=40", "eval.checks=false", "log.mlflow=true",
                     f"log.mlflow_uri={store}"])
    assert train(cfg, out, stop_after_epoch=1) is None
    run_id = json.loads((out / "mlflow.json").read_text())["run_id"]
    client = _client(store)
    assert client.get_run(run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]
    assert train(cfg, out, resume=True, stop_after_epoch=2, changes={"log.mlflow": False}) is None
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1]
    assert train(cfg, out, resume=True, changes={"log.mlflow": True}) is not None
    assert json.loads((out / "mlflow.json").read_text())["run_id"] == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[SYNCED] == "3"
    log = _log(out)
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == \
        pytest.approx([r["loss"] for r in log], rel=1e-9)
    exp = client.get_experiment_by_name("dorat")
    assert len(client.search_runs([exp.experiment_id])) == 1  # one MLflow run for the dorat run


def test_an_mlflow_store_that_does_not_answer_is_one_line_before_anything_is_written(
        synthetic_npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    args = ["train", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1", "--out", str(run),
            "--log", "mlflow", *TINY]
    code, _, err = run_cli(capsys, *args, "--set", "log.mlflow_uri=http://127.0.0.1:9")
    assert code == 2 and err.count("\n") == 1, err
    assert "MLflow tracking store does not answer" in err and "log.mlflow_uri" in err
    assert not run.exists()
    blocked = tmp_path / "file"
    blocked.write_text("")
    code, _, err = run_cli(capsys, *args, "--set", f"log.mlflow_uri={blocked / 'store'}")
    assert code == 2 and err.count("\n") == 1 and "cannot create" in err, err
    assert not run.exists()
    monkeypatch.setitem(sys.modules, "mlflow", None)  # the package is not installed
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "pip install 'dorat[mlflow]'" in err, err
    assert not run.exists()


def test_compare_and_tune_tag_their_mlflow_runs(synthetic_npz: Path, tmp_path: Path, store: Path,
                                                capsys: pytest.CaptureFixture,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(store))  # --log mlflow's default store
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"""
base: fmnist-demo
datasets: ["npz:{synthetic_npz}"]
set: {{epochs: 1, attack.steps: 1, eval.n: 40, eval.checks: false}}
methods: [at]
seeds: [0]
""")
    code, _, err = run_cli(capsys, "compare", str(grid), "--out", str(tmp_path / "cmp"), "--log", "mlflow")
    assert code == 0, err
    code, _, err = run_cli(capsys, "tune", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1",
                           "--space", "optim.lr=log:0.01:0.1", "--objective", "val.sa", "--trials", "1",
                           "--out", str(tmp_path / "tune"), "--log", "mlflow", "--set", "attack.steps=1",
                           "--set", "eval.n=40", "--set", "data.val_size=64", "--set", "val.n=32")
    assert code == 0, err
    client = _client(store)
    runs = client.search_runs([client.get_experiment_by_name("dorat").experiment_id])
    by_kind = {("grid" if "dorat.grid" in r.data.tags else "trial"): r.data.tags for r in runs}
    assert len(runs) == 2 and set(by_kind) == {"grid", "trial"}
    g = by_kind["grid"]
    assert g["dorat.grid"] == str((tmp_path / "cmp").resolve())
    assert (g["dorat.grid.setting"], g["dorat.grid.method"], g["dorat.seed"]) == ("default", "at", "0")
    tr = by_kind["trial"]
    assert tr["dorat.trial"] == "0" and tr["dorat.study.dir"] == str((tmp_path / "tune").resolve())
    assert tr["dorat.study"]
