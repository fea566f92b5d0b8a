"""Reliability: kill -9 at random moments and during a checkpoint write, then --resume, ends
bitwise equal to an uninterrupted run; a NaN loss stops training keeping the last good
checkpoint; same seed, same metrics (AutoAttack included). Code-running pickles offered to every
loading path are rows of the hostile-input matrix (test_hostile.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dorat import config as C
from dorat.checkpoint import load_state
from dorat.errors import DoratError
from dorat.evaluate import EvalSettings, evaluate
from dorat.run import load_run, train

ARGS = ["--method", "done", "--epochs", "6", "--set", "batch_size=32", "--set", "attack.steps=2",
        "--set", "attack.alpha=0.05", "--set", "done.warmup=0", "--set", "eval.n=40",
        "--set", "eval.steps=3", "--set", "eval.check_n=20", "--set", "data.augment=crop-flip",
        "--set", "log.progress=off"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _cmd(npz: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dorat", "train", "--dataset", f"npz:{npz}", "--out", str(out),
            *ARGS, *extra]


def _finish(npz: Path, out: Path) -> None:
    """What a user does after a crash: resume if there is a checkpoint, else start over."""
    extra = ["--resume"] if (out / "checkpoint.safetensors").exists() else ["--overwrite"]
    r = subprocess.run(_cmd(npz, out, *extra), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    ma.pop("eval_seconds"), mb.pop("eval_seconds")
    assert ma == mb
    la, lb = ([{k: v for k, v in json.loads(line).items() if k not in ("seconds", "examples_per_s")}
               for line in (d / "log.jsonl").read_text().splitlines()] for d in (a, b))
    assert la == lb  # loss, accuracies, weights diagnostics, DONE's log_u: every epoch
    assert not list(b.glob(".*.tmp")), "a temporary file was left behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import make_synthetic_npz

    d = tmp_path_factory.mktemp("kill")
    npz = make_synthetic_npz(d / "toy.npz", n_train=384, n_test=80)
    r = subprocess.run(_cmd(npz, d / "ref"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return npz, d / "ref"


def test_kill_minus_9_at_random_moments_then_resume(reference: tuple[Path, Path], tmp_path: Path) -> None:
    npz, ref = reference
    rng = random.Random(1234)
    outcomes = []
    for trial in range(5):
        out = tmp_path / f"t{trial}"
        proc = subprocess.Popen(_cmd(npz, out), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # wait until a random number of epochs is logged, then a random extra delay: the kill
        # lands mid-epoch, between log line and checkpoint, or inside a checkpoint write
        target = rng.randint(0, 4)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            n = len((out / "log.jsonl").read_text().splitlines()) if (out / "log.jsonl").exists() else 0
            if n >= target:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        epochs = load_state(out / "checkpoint.safetensors")[0]["epoch"] if \
            (out / "checkpoint.safetensors").exists() else 0
        outcomes.append(epochs)
        _finish(npz, out)
        _same_run(ref, out)
    print(f"kill -9 trials: epochs in the checkpoint at the kill = {outcomes}")
    assert len(set(outcomes)) >= 2, outcomes  # the kills did land at different moments


CRASH_IN_WRITE = """
import os, sys
import dorat.checkpoint as ck
real, n = ck.save_file, [0]
def torn(tensors, path, metadata=None):
    real(tensors, path, metadata=metadata)
    if ".checkpoint.safetensors." in str(path):
        n[0] += 1
        if n[0] == int(os.environ["CRASH_AT"]):
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])  # half a file on disk, then death
            os._exit(137)
ck.save_file = torn
from dorat.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_crash_inside_a_checkpoint_write_keeps_the_previous_one(reference: tuple[Path, Path],
                                                                 tmp_path: Path) -> None:
    npz, ref = reference
    out = tmp_path / "torn"
    cmd = _cmd(npz, out)
    r = subprocess.run([sys.executable, "-c", CRASH_IN_WRITE, *cmd[3:]], capture_output=True,
                       text=True, env={**ENV, "CRASH_AT": "3"})
    assert r.returncode == 137
    assert list(out.glob(".checkpoint.safetensors.*.tmp"))  # the torn temporary file
    assert load_state(out / "checkpoint.safetensors")[0]["epoch"] == 2  # previous one intact
    _finish(npz, out)
    _same_run(ref, out)


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(
        tmp_path: Path, synthetic_npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 3, "batch_size": 64},
                    ["attack.steps=1", "eval.n=20"])
    assert train(cfg, tmp_path / "r", stop_after_epoch=1, log=lambda s: None) is None
    good = (tmp_path / "r" / "checkpoint.safetensors").read_bytes()
    from dorat.objectives.losses import CELoss

    real = CELoss.__call__

    def poisoned(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        out = real(self, *a, **k)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(CELoss, "__call__", poisoned)
    with pytest.raises(DoratError, match=r"diverged at epoch 2 \(loss is nan\).*last good checkpoint"):
        train(cfg, tmp_path / "r", resume=True, log=lambda s: None)
    assert (tmp_path / "r" / "checkpoint.safetensors").read_bytes() == good
    assert not (tmp_path / "r" / "model.safetensors").exists()
    assert len((tmp_path / "r" / "log.jsonl").read_text().splitlines()) == 1


def test_same_seed_same_metrics_including_autoattack(tmp_path: Path, synthetic_npz: Path) -> None:
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 2, "batch_size": 64,
                           "method": "done"},
                    ["attack.steps=2", "eval.n=40", "eval.attacks=pgd,cw", "done.warmup=0"])
    a = train(cfg, tmp_path / "a", log=lambda s: None)
    b = train(cfg, tmp_path / "b", log=lambda s: None)
    assert a is not None and b is not None
    a.pop("eval_seconds"), b.pop("eval_seconds")
    assert a == b
    run = load_run(tmp_path / "a", "cpu")
    s = EvalSettings(eps=0.1, seed=3, aa_budget={"iters": 5, "queries": 50, "targets": 2})
    x, y = run.data.x_test, run.data.y_test
    m1, t1 = evaluate(run.model, x, y, run.data.classes, ["aa"], s, n=40)
    torch.manual_seed(999)  # the global RNG state must not matter
    m2, t2 = evaluate(run.model, x, y, run.data.classes, ["aa"], s, n=40)
    assert m1 == m2 and all(torch.equal(t1[k], t2[k]) for k in t1)
