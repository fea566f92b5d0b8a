"""TensorBoard tracking (log.tensorboard): event files in RUN/tb, read back with TensorBoard's own
reader; a resumed run's curves hold each epoch once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from dorat import config as C
from dorat.runs.run import train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_tensorboard_curves_match_the_log(synthetic_npz: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--method", "done",
                           "--epochs", "2", "--out", str(run), "--log", "tensorboard",
                           "--set", "done.warmup=0", "--set", "done.r=0.5", "--set", "attack.steps=1",
                           "--set", "eval.n=40", "--set", "eval.checks=false")
    assert code == 0, err
    acc = _events(run)
    tags = acc.Tags()
    log = _log(run)
    for key in ("loss", "train_acc_adv", "train_acc_clean", "lr", "seconds", "examples_per_s", "ess",
                "w_max", "w_sum_mean", "r"):
        ev = acc.Scalars(f"train/{key}")
        assert [e.step for e in ev] == [1, 2], key
        assert [e.value for e in ev] == pytest.approx([r[key] for r in log], rel=1e-6), key
    for c in range(4):  # each class's mean weight, named by the class
        ev = acc.Scalars(f"weights/class_mean/{c}")
        assert [e.value for e in ev] == pytest.approx([r["w_class_mean"][c] for r in log], rel=1e-5)
    hist = acc.Histograms("weights/instance")
    assert [h.step for h in hist] == [1, 2] and hist[-1].histogram_value.num == 512
    metrics = json.loads((run / "metrics.json").read_text())
    assert acc.Scalars("final/sa")[0].value == pytest.approx(metrics["sa"])
    assert acc.Scalars("final/ra/pgd")[0].step == 2
    for c in range(4):
        assert acc.Scalars(f"final/per_class/pgd/{c}")[0].value == \
            pytest.approx(metrics["per_class"]["pgd"][c])
    assert "train/epoch" not in tags["scalars"]


def test_resumed_run_holds_each_epoch_once(synthetic_npz: Path, tmp_path: Path) -> None:
    """A crash after the event file got epoch 2 but before epoch 2's checkpoint: the resume
    from epoch 1 purges the orphaned events (purge_step), so step 2 is there once."""
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 3, "method": "done"},
                    ["done.warmup=0", "attack.steps=1", "eval.n=40", "eval.checks=false",
                     "log.tensorboard=true"])
    out = tmp_path / "r"
    assert train(cfg, out, stop_after_epoch=1, log=lambda s: None) is None
    saved = (out / "checkpoint.safetensors").read_bytes()
    assert train(cfg, out, resume=True, stop_after_epoch=2, log=lambda s: None) is None
    (out / "checkpoint.safetensors").write_bytes(saved)  # the epoch-2 checkpoint never landed
    assert train(cfg, out, resume=True, log=lambda s: None) is not None
    acc = _events(out)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in _log(out)], rel=1e-6)


def test_overwrite_replaces_the_curves(synthetic_npz: Path, tmp_path: Path) -> None:
    base = ["attack.steps=1", "eval.n=40", "eval.checks=false", "log.tensorboard=true"]
    out = tmp_path / "r"
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 2}, base)
    train(cfg, out, log=lambda s: None)
    cfg1 = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 1}, base)
    train(cfg1, out, overwrite=True, log=lambda s: None)
    assert [e.step for e in _events(out).Scalars("train/loss")] == [1]
    cfg_off = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 1}, base[:-1])
    train(cfg_off, out, overwrite=True, log=lambda s: None)
    assert not (out / "tb").exists()  # the new run has no curves: the old ones go


def test_missing_tensorboard_is_one_line(synthetic_npz: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1",
                           "--out", str(tmp_path / "x"), "--log", "tensorboard")
    assert code == 2 and err.strip().splitlines() == [
        "dorat: error: log.tensorboard needs the tensorboard package: pip install "
        "'dorat[tensorboard]' (or pip install tensorboard), or turn it off"]
    assert not (tmp_path / "x").exists()


def test_validation_probe_every_epoch_for_any_method(synthetic_npz: Path, tmp_path: Path) -> None:
    """val.every: PGD-AT (which needs no validation) probes the validation subset after each
    epoch; the numbers are in log.jsonl and TensorBoard's val/ group, and on_epoch sees them."""
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 2, "method": "at"},
                    ["attack.steps=1", "eval.n=40", "eval.checks=false", "data.val_size=40",
                     "val.n=40", "val.steps=2", "val.every=1", "log.tensorboard=true"])
    seen: list[dict] = []
    out = tmp_path / "r"
    assert train(cfg, out, log=lambda s: None, on_epoch=seen.append) is not None
    log = _log(out)
    assert [r["epoch"] for r in seen] == [1, 2] and seen == log
    for r in log:
        assert 0 <= r["val_worst_class_pgd"] <= r["val_tail30_pgd"] <= r["val_ra_pgd"] + 1e-9
        assert r["val_ra_pgd"] <= r["val_sa"] + 0.05 and r["val_seconds"] > 0
    acc = _events(out)
    assert [e.value for e in acc.Scalars("val/ra_pgd")] == pytest.approx([r["val_ra_pgd"] for r in log])
    assert "train/val_sa" not in acc.Tags()["scalars"]
