"""Per-epoch validation robustness: best.safetensors by a probe metric, `dorat eval --which
best`, and the catastrophic-overfitting guard (its rule on hand-written epochs, then real runs:
a single-step run that overfits catastrophically and a PGD-AT run that does not)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from conftest import run_cli
from dorat import config as C
from dorat.runs.run import train
from dorat.training.guard import Watch


def _watch(tmp: Path, restore: bool, lines: list[str], margin: float = 0.2) -> Watch:
    return Watch(tmp, "val_ra_pgd" if restore else None, True, margin, restore, 10, lines.append,
                 {"method": "fast-at"})


def _model(v: float) -> nn.Module:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.fill_(v)
        m.bias.fill_(v)
    return m


def test_guard_rule_on_hand_written_epochs(tmp_path: Path) -> None:
    """Fires when the probe's PGD accuracy falls more than the margin below its best epoch while
    the training attack's accuracy rises; not on a drop with falling training accuracy (a bad
    epoch, not catastrophic overfitting), not on a drop within the margin."""
    lines: list[str] = []
    w = _watch(tmp_path, True, lines)
    epochs = [  # (probe PGD accuracy, training-attack accuracy) per epoch
        (0.30, 0.40), (0.45, 0.50), (0.20, 0.45),  # a drop of 0.25, but FGSM accuracy fell too
        (0.40, 0.55), (0.30, 0.60),  # a drop of 0.15: within the margin
        (0.10, 0.80),  # 0.45 -> 0.10 while FGSM rises: catastrophic overfitting
    ]
    fired = []
    for e, (ra, fg) in enumerate(epochs, 1):
        record = {"epoch": e, "val_ra_pgd": ra, "train_acc_adv": fg}
        stop = w.after_epoch(record, _model(float(e)), main=True)
        fired.append(record.get("co_event", False))
        if stop:
            break
    assert fired == [False] * 5 + [True] and stop
    assert record["co_restored_to"] == 2 and w.restored_to == 2
    best = load_file(str(tmp_path / "best.safetensors"))
    assert float(best["weight"][0, 0]) == 2.0  # epoch 2's weights, the best probe accuracy
    m = _model(0.0)
    assert w.final(m) and float(m.weight.detach()[0, 0]) == 2.0
    text = "\n".join(lines)
    assert "catastrophic overfitting at epoch 6" in text and "45.0% (epoch 2) to 10.0%" in text
    # without --co-restore it warns and goes on
    lines.clear()
    w = _watch(tmp_path / "w2", False, lines)
    for e, (ra, fg) in enumerate(epochs, 1):
        assert not w.after_epoch({"epoch": e, "val_ra_pgd": ra, "train_acc_adv": fg}, _model(e), True)
    assert not w.final(_model(0.0)) and len(lines) == 1 and "--co-restore" in lines[0]


FM = ["optim.lr=0.05", "optim.schedule=constant", "eval.n=40", "eval.checks=false",
      "data.train_subset=2000", "data.val_size=500", "val.n=300", "val.steps=10", "batch_size=64"]


def test_best_checkpoint_and_eval_which_best(synthetic_npz: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--method", "at",
                           "--epochs", "3", "--out", str(out), "--set", "attack.steps=1",
                           "--set", "eval.n=40", "--set", "eval.checks=false",
                           "--set", "data.val_size=40", "--set", "val.n=40", "--set", "val.steps=2",
                           "--set", "val.keep_best=worst_class_pgd")
    assert code == 0, err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all("val_worst_class_pgd" in r for r in log) and "co_event" not in str(log)
    best = max(log, key=lambda r: (r["val_worst_class_pgd"], -r["epoch"]))
    assert [r["epoch"] for r in log if r.get("best")][-1] == best["epoch"]
    from safetensors import safe_open

    with safe_open(str(out / "best.safetensors"), "pt") as f:
        assert f.metadata()["epoch"] == str(best["epoch"])
    code, stdout, err = run_cli(capsys, "eval", str(out), "--which", "best", "--attacks", "pgd")
    assert code == 0, err
    assert json.loads((out / "eval-best.json").read_text())["n"] == 40
    # a run without it: one clear line
    plain = tmp_path / "plain"
    assert run_cli(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1", "--out",
                   str(plain), "--set", "attack.steps=1", "--set", "eval.n=40",
                   "--set", "eval.checks=false")[0] == 0
    code, _, err = run_cli(capsys, "eval", str(plain), "--which", "best")
    assert code == 2 and "has no best.safetensors" in err
    # keep_best without a validation split: a word that the training split chose
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1",
                           "--out", str(tmp_path / "ontrain"), "--set", "attack.steps=1",
                           "--set", "eval.n=40", "--set", "eval.checks=false", "--set", "val.n=40",
                           "--set", "val.steps=1", "--set", "val.keep_best=ra_pgd")
    assert code == 0 and "picks best.safetensors on a fixed subset of the training split" in err


def test_guard_probes_the_training_split_without_validation(synthetic_npz: Path, tmp_path: Path) -> None:
    """A single-step run: the guard is on by default and, with no validation split, probes a
    fixed stratified training subset each epoch."""
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 2, "method": "fast-at"},
                    ["eval.n=40", "eval.checks=false", "val.n=80", "val.steps=2"])
    lines: list[str] = []
    assert train(cfg, tmp_path / "r", log=lines.append) is not None
    log = [json.loads(line) for line in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["probe_split"] for r in log] == ["train", "train"] and all("val_ra_pgd" in r for r in log)
    assert not any("warning" in line for line in lines), lines


def test_guard_fires_on_catastrophic_overfitting_and_not_on_a_normal_run(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Real Fashion-MNIST (2,000 images): FGSM from zero at ε = 0.2 with a constant lr overfits
    catastrophically within a few epochs (measured: the probe's PGD-10 accuracy fell from 24.7%
    to 8.0% at epoch 4 while FGSM training accuracy rose from 43% to 49%); the guard (margin
    0.1) fires, --co-restore stops there and keeps the best epoch. Fast AT as published (random
    start) at ε = 0.1 on the same data is left alone."""
    co = C.resolve(None, {"dataset": "fashion-mnist", "epochs": 6, "method": "fast-at"},
                   [*FM, "attack.eps=0.2", "attack.random_start=false", "val.co_margin=0.1",
                    "val.co_restore=true",
                    # the recipe was measured in fp32; under bf16 autocast (the default on a
                    # native-bf16 CPU) it did not overfit within 6 epochs and the guard stayed quiet
                    "perf.amp=off"])
    lines: list[str] = []
    out = tmp_path / "co"
    assert train(co, out, log=lines.append) is not None
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = [r for r in log if r.get("co_event")]
    assert events and events[0] is log[-1], "the guard stops the run at the first event"
    assert len(log) <= 6 and (out / "metrics.json").is_file()
    back = events[0]["co_restored_to"]
    assert back == max(log, key=lambda r: (r["val_ra_pgd"], -r["epoch"]))["epoch"]
    assert any("catastrophic overfitting" in line for line in lines)
    final, best = load_file(str(out / "model.safetensors")), load_file(str(out / "best.safetensors"))
    assert all(torch.equal(final[k], best[k]) for k in final)
    code, _, err = run_cli(capsys, "report", str(out), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    text = (tmp_path / "rep" / "report.md").read_text()
    assert f"catastrophic overfitting detected at epoch(s) {events[0]['epoch']}" in text
    assert f"final model = epoch {back}'s weights" in text
    normal = C.resolve(None, {"dataset": "fashion-mnist", "epochs": 3, "method": "fast-at"},
                       [*FM, "attack.eps=0.1", "val.co_margin=0.1"])
    lines.clear()
    assert train(normal, tmp_path / "normal", log=lines.append) is not None
    log = [json.loads(line) for line in (tmp_path / "normal" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and not any(r.get("co_event") for r in log), log
    assert not any("catastrophic" in line for line in lines)


def test_warnings_name_the_fallback(synthetic_npz: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 on a device without native bf16 and a probe larger than its split: one line each."""
    from dorat.system import runtime

    assert runtime.bf16_native("cpu", "flags : fpu avx2 avx512f") is False
    assert runtime.bf16_native("cpu", "flags : fpu avx512_bf16 amx_bf16") is True
    info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: fpu\n"
    assert runtime.machine("cpu", info)["cpu"] == "AMD EPYC 9B14"
    assert runtime.machine("cpu", "")["cpu"]  # no /proc/cpuinfo: what platform knows
    monkeypatch.setattr(runtime, "bf16_native", lambda device_type, cpuinfo=None: False)
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 1, "method": "at"},
                    ["attack.steps=1", "eval.n=40", "eval.checks=false", "perf.amp=bf16",
                     "data.val_size=40", "val.every=1", "val.n=500", "val.steps=1"])
    lines: list[str] = []
    assert train(cfg, tmp_path / "r", log=lines.append) is not None
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 2
    assert "perf.amp=bf16 on a cpu without native bf16" in warnings[0]
    assert "val.n=500 is more than the validation split's 40 examples" in warnings[1]
