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
from dorat.cli import main
from dorat.errors import CheckpointError, DoratError
from dorat.evaluation.evaluate import EvalSettings, evaluate
from dorat.files.checkpoint import load_state
from dorat.runs.run import load_run, train

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
    timing = ("seconds", "cpu_seconds", "examples_per_s", "val_seconds")
    la, lb = ([{k: v for k, v in json.loads(line).items() if k not in timing}
               for line in (d / "log.jsonl").read_text().splitlines()] for d in (a, b))
    assert la == lb  # loss, accuracies, weights diagnostics, DONE's log_u: every epoch
    assert not list(b.glob(".*.tmp")), "a temporary file was left behind"
    for f in ("model.safetensors", "checkpoint.safetensors"):  # byte for byte: a hash can tell
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


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
import dorat.files.checkpoint as ck
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


def _tiny(npz: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", f"npz:{npz}", "--out", str(out), "--epochs", "2",
            "--set", "attack.steps=1", "--set", "eval.n=20", "--set", "eval.checks=false",
            "--set", "log.progress=off", *extra]


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_resume_is_idempotent_for_a_requeued_job(tmp_path: Path, synthetic_npz: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A scheduler requeues a job with the same command line, --resume included: it starts the
    run when there is nothing to resume, starts again a run killed before its first checkpoint,
    and reports a finished run without touching it."""
    out = tmp_path / "run"
    assert main(_tiny(synthetic_npz, out, "--resume")) == 0
    assert f"nothing to resume in {out}: starting a new run" in capsys.readouterr().err
    done = _files(out)
    assert main(_tiny(synthetic_npz, out, "--resume")) == 0
    assert "holds a finished run: nothing to resume" in capsys.readouterr().err
    assert _files(out) == done
    # killed before its first checkpoint: only config.yaml (and maybe a log line) exist
    for f in ("checkpoint.safetensors", "model.safetensors", "weights.safetensors", "metrics.json"):
        (out / f).unlink()
    saved = (out / "config.yaml").read_text()
    assert main(["train", "--out", str(out), "--resume"]) == 0
    assert "has no checkpoint yet" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == saved
    assert (out / "model.safetensors").read_bytes() == done["model.safetensors"]  # same run


def test_resume_may_change_the_optimizer_but_not_the_model(tmp_path: Path, synthetic_npz: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """The advice after a divergence ('lower optim.lr, then --resume') works: the change is
    validated, applied from the next epoch, written to config.yaml and recorded in history.jsonl;
    a key the checkpoint depends on is refused."""
    out = tmp_path / "run"
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "epochs": 3, "batch_size": 64},
                    ["attack.steps=1", "eval.n=20", "eval.checks=false", "optim.schedule=constant"])
    assert train(cfg, out, stop_after_epoch=1, log=lambda s: None) is None
    before = _files(out)
    assert main(["train", "--out", str(out), "--resume", "--set", "attack.eps=0.2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dorat: error: --resume cannot change attack.eps")
    assert _files(out) == before
    assert main(["train", "--out", str(out), "--resume", "--set", "optim.lr=0.01"]) == 0
    assert "resuming with optim.lr=0.01" in capsys.readouterr().err
    lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert lrs == [0.1, 0.01, 0.01]
    assert "lr: 0.01" in (out / "config.yaml").read_text()
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert history == [{"after_epoch": 1, "set": {"optim.lr": 0.01}}]


def test_overwrite_keeps_the_old_run_until_the_new_one_has_finished(tmp_path: Path,
                                                                   synthetic_npz: Path) -> None:
    from dorat.runs.rundir import COMPLETE, STAGE, finish_replacement

    out = tmp_path / "run"
    base = {"dataset": f"npz:{synthetic_npz}", "epochs": 2, "batch_size": 64}
    sets = ["attack.steps=1", "eval.n=20", "eval.checks=false"]
    assert train(C.resolve(None, base, sets), out, log=lambda s: None) is not None
    (out / "eval-extra.json").write_text("{}")  # an evaluation of the old model
    old = _files(out)
    new_cfg = C.resolve(None, {**base, "seed": 1}, sets)
    assert train(new_cfg, out, overwrite=True, stop_after_epoch=1, log=lambda s: None) is None
    assert _files(out) == old  # stopped (or crashed) half-way: the old run is intact
    assert (out / STAGE / "checkpoint.safetensors").is_file()
    logs: list[str] = []
    assert train(new_cfg, out, resume=True, log=logs.append) is not None  # the replacement goes on
    assert any("replaced" in m for m in logs) and not (out / STAGE).exists()
    assert "seed: 1" in (out / "config.yaml").read_text()
    assert not (out / "eval-extra.json").exists()  # belonged to the old model
    assert (out / "metrics.json").read_bytes() != old["metrics.json"]
    # a crash in the middle of the swap: the next owner completes it from the journal
    stage = out / STAGE
    stage.mkdir()
    (stage / "metrics.json").write_text('{"new": 1}')
    (stage / "log.jsonl").write_text("")
    (stage / COMPLETE).write_text(json.dumps(["log.jsonl", "metrics.json"]))
    (stage / "log.jsonl").replace(out / "log.jsonl")  # moved before the crash
    finish_replacement(out)
    assert (out / "metrics.json").read_text() == '{"new": 1}' and (out / "log.jsonl").read_text() == ""
    assert not stage.exists()
    assert not (out / "config.yaml").exists()  # not in the journal: the old run's file, gone


def test_eval_never_reads_a_run_in_the_middle(tmp_path: Path, synthetic_npz: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    """`dorat eval RUN` while another process owns RUN (it trains) is refused, not evaluated at
    its last checkpoint; after a crash inside a journaled --overwrite swap (the new config.yaml
    moved in, the old weights still there) it completes the swap and evaluates the new weights
    under the new config."""
    import shutil

    from conftest import run_cli
    from dorat.runs.rundir import COMPLETE, STAGE

    base = {"dataset": f"npz:{synthetic_npz}", "epochs": 1, "batch_size": 64}
    sets = ["attack.steps=1", "eval.n=20", "eval.checks=false"]
    out, new = tmp_path / "run", tmp_path / "new"
    train(C.resolve(None, base, sets), out, log=lambda s: None)
    train(C.resolve(None, {**base, "seed": 1}, sets), new, log=lambda s: None)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\nfrom dorat import locks\n"
         "with locks.own(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(120)\n",
         str(out)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        code, _, err = run_cli(capsys, "eval", str(out), "--attacks", "pgd", "--n", "8")
        assert code == 2 and "is in use by another dorat process" in err and "still training" in err
        assert not (out / "eval.json").exists()
    finally:
        holder.kill()
        holder.wait()
    stage = out / STAGE  # the swap's journal is written, one file moved, then the crash
    shutil.copytree(new, stage)
    names = sorted(p.name for p in stage.iterdir())
    (stage / COMPLETE).write_text(json.dumps(names))
    (stage / "config.yaml").replace(out / "config.yaml")
    code, _, err = run_cli(capsys, "eval", str(out), "--attacks", "pgd", "--n", "8")
    assert code == 0, err
    assert not stage.exists()
    assert (out / "model.safetensors").read_bytes() == (new / "model.safetensors").read_bytes()
    assert "seed: 1" in (out / "config.yaml").read_text()


def test_sigterm_stops_with_a_distinct_code_and_the_requeued_job_resumes_bitwise(
        reference: tuple[Path, Path], tmp_path: Path) -> None:
    npz, ref = reference
    out = tmp_path / "term"
    proc = subprocess.Popen(_cmd(npz, out), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "log.jsonl").exists():
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("dorat: terminated (SIGTERM)")
    assert not list(out.glob(".*.tmp"))
    r = subprocess.run(_cmd(npz, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same_run(ref, out)


def test_same_tensors_give_the_same_bytes_in_two_processes(tmp_path: Path) -> None:
    code = ("import sys, torch; from dorat.files.checkpoint import save_state\n"
            "save_state(sys.argv[1], {'a': torch.arange(6.0), 'b': {'c': 1, 'd': 'x', 'e': 2.5}},"
            " meta={'method': 'done', 'model': 'small-cnn', 'dataset': 'npz'})")
    files = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, env=ENV)
    assert len({f.read_bytes() for f in files}) == 1
    assert load_state(files[0])[0]["b"] == {"c": 1, "d": "x", "e": 2.5}


@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    """A 3 MB tmpfs: room for a first checkpoint of the small CNN but not for a second beside it.
    Needs root (as CI has); elsewhere the test is skipped, saying why."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_keeps_the_checkpoint_and_the_run_resumes(
        reference: tuple[Path, Path], small_disk: Path) -> None:
    npz, ref = reference
    out = small_disk / "run"
    r = subprocess.run(_cmd(npz, out), env=ENV, capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("dorat: error: no space left on the device writing")
    assert "Traceback" not in r.stderr
    epoch = load_state(out / "checkpoint.safetensors")[0]["epoch"]
    assert epoch >= 1 and not list(out.glob(".*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    r = subprocess.run(_cmd(npz, out, "--resume"), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _same_run(ref, out)
    # an evaluation into a directory that became read-only fails before it evaluates
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    r = subprocess.run([sys.executable, "-m", "dorat", "eval", str(out), "--out",
                        str(out / "e.json")], env=ENV, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith(f"dorat: error: cannot write {out / 'e.json'}")
    assert "evaluating" not in r.stderr


MID_EPOCH = [  # the weightings that keep state within an epoch, and plain AT
    ("at", []), ("gairat", []), ("done", ["done.warmup=0"]), ("done-class", ["done.warmup=0"]),
    ("done", ["done.warmup=0", "done.level=mixed"]), ("done-val", []),
("frl-rwrm", ["frl.warmup=1"]),
    ("wat", []), ("trades-cfa", ["cfa.fawa_threshold=0"]), ("dafa", ["dafa.warmup=1"]),
    ("faal-scratch", []), ("at", ["optim.ema=0.9"]), ("done-val", ["optim.ema=0.9", "val.every=1"]),
]


@pytest.fixture
def sigterm_raises():  # noqa: ANN201
    """SIGTERM handled as the CLI handles it (raise Terminated), and SIGINT as Python handles it
    in a foreground process (KeyboardInterrupt), inside this test only: a test runner started in
    the background by a non-interactive shell inherits SIGINT ignored, and a stop that the
    process ignores is rightly never held."""
    from dorat.errors import raise_terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_int)


@pytest.mark.parametrize("method,sets", MID_EPOCH,
                         ids=[f"{m}{'+' + s[-1] if s else ''}" for m, s in MID_EPOCH])
def test_sigterm_mid_epoch_checkpoints_the_batches_done_and_resumes_bitwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sigterm_raises: None, method: str,
        sets: list[str]) -> None:
    from conftest import make_synthetic_npz
    from dorat.errors import Terminated
    from dorat.training import trainer

    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=272, n_test=40)
    cfg = C.resolve(None, {"dataset": f"npz:{npz}", "method": method, "epochs": 2, "batch_size": 64},
                    ["attack.steps=2", "eval.n=20", "eval.checks=false", "eval.steps=1", "data.val_size=80",
                     "val.n=40", "val.steps=1", "data.augment=crop-flip", *sets])
    train(cfg, tmp_path / "a", log=lambda s: None)
    real, calls = trainer.Trainer.step, [0]

    def step(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        real(self, *a, **k)
        calls[0] += 1
        if calls[0] == 5:  # epoch 2 (of 3 batches each), batch 2: a scheduler's stop
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(trainer.Trainer, "step", step)
    lines: list[str] = []
    with pytest.raises(Terminated):
        train(cfg, tmp_path / "b", log=lines.append)
    assert lines[-1] == "stopped in epoch 2 after batch 2/3; the checkpoint holds it"
    state = load_state(tmp_path / "b" / "checkpoint.safetensors")[0]
    assert state["epoch"] == 1 and state["mid_epoch"]["step"] == 2
    monkeypatch.setattr(trainer.Trainer, "step", real)
    lines.clear()
    train(cfg, tmp_path / "b", resume=True, log=lines.append)
    assert any(s.endswith("after epoch 1/2 and 2/3 batches of the next") for s in lines), lines
    _same_run(tmp_path / "a", tmp_path / "b")


def test_a_crash_mid_epoch_resumes_from_the_timed_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """log.checkpoint_minutes: the clock's checkpoints inside an epoch survive a crash that no
    handler sees (here: an error in the 5th step; in life: SIGKILL, a node lost)."""
    from conftest import make_synthetic_npz
    from dorat.training import midepoch, trainer

    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=192, n_test=40)
    sets = ["attack.steps=2", "eval.n=20", "eval.checks=false", "eval.steps=1", "done.warmup=0"]
    cfg = C.resolve(None, {"dataset": f"npz:{npz}", "method": "done", "epochs": 2, "batch_size": 64},
                    [*sets, "log.checkpoint_minutes=1e-9"])  # a checkpoint after every batch
    train(cfg, tmp_path / "a", log=lambda s: None)
    real, calls = trainer.Trainer.step, [0]

    def step(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        calls[0] += 1
        if calls[0] == 6:  # epoch 2, batch 3 of 3
            raise RuntimeError("the machine went away")
        real(self, *a, **k)

    monkeypatch.setattr(trainer.Trainer, "step", step)
    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "b", log=lambda s: None)
    state = load_state(tmp_path / "b" / "checkpoint.safetensors")[0]
    assert (state["epoch"], state["mid_epoch"]["step"]) == (1, 2)
    monkeypatch.setattr(trainer.Trainer, "step", real)
    from dorat.files.checkpoint import save_state

    ck = tmp_path / "b" / "checkpoint.safetensors"
    good = ck.read_bytes()
    save_state(ck, {**state, "mid_epoch": {**state["mid_epoch"], "step": 7}})  # not this run's
    with pytest.raises(CheckpointError, match="taken after batch 7 of an epoch of 3"):
        train(cfg, tmp_path / "b", resume=True, log=lambda s: None)
    ck.write_bytes(good)
    train(cfg, tmp_path / "b", resume=True, log=lambda s: None)
    _same_run(tmp_path / "a", tmp_path / "b")
    # with the default (30 minutes) a short epoch only checkpoints at its end
    default = C.resolve(None, {"dataset": f"npz:{npz}", "method": "done", "epochs": 1,
                               "batch_size": 64}, sets)
    saves: list[int] = []
    monkeypatch.setattr(midepoch, "save", lambda *a, **k: saves.append(1))
    train(default, tmp_path / "c", log=lambda s: None)
    assert not saves


def test_weighting_state_a_checkpoint_cannot_hold_is_named_at_the_first_mid_epoch_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plug-in keeping epoch state as, say, a numpy array: the default step_state cannot store
    it, so the run says so once (naming it) instead of resuming differently without a word."""
    import numpy as np

    from conftest import make_synthetic_npz
    from dorat.objectives.base import Weighting

    def start_epoch(self, epoch, epochs, measure=None) -> None:  # noqa: ANN001
        self.hist, self.seen = np.zeros(3), epoch  # seen is storable, hist is not

    monkeypatch.setattr(Weighting, "start_epoch", start_epoch)  # "uniform" (at)
    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=192, n_test=40)
    cfg = C.resolve(None, {"dataset": f"npz:{npz}", "method": "at", "epochs": 2, "batch_size": 64},
                    ["attack.steps=1", "eval.n=20", "eval.checks=false", "eval.steps=1",
                     "log.checkpoint_minutes=1e-9"])  # a checkpoint after every batch
    lines: list[str] = []
    train(cfg, tmp_path / "r", log=lines.append)
    warned = [s for s in lines if s.startswith("warning: the weighting")]
    assert warned == [
        "warning: the weighting 'uniform' keeps hist in a form a checkpoint cannot store (only "
        "tensors, numbers, strings, None and lists/tuples/dicts of them), so a resume within an "
        "epoch starts without it; override its step_state and load_step_state (docs/ARCHITECTURE.md)"]
    w = Weighting()
    start_epoch(w, 1, 2)
    assert w.step_state()["attrs"] == {"seen": 1} and w.unstored_attrs() == ["hist"]

    class Own(Weighting):
        def step_state(self) -> dict:
            return {"hist": self.hist.tolist()}

    w = Own()
    start_epoch(w, 1, 2)
    assert w.unstored_attrs() == []  # its own step_state: its business

    from dorat.objectives.done import KLDROWeighting
    from dorat.system.distributed import Dist

    done = KLDROWeighting()  # under torchrun: its process group is bound again on resume, not state
    done.bind({"num_classes": 10, "dist": Dist()})
    assert done.unstored_attrs() == [] and "dist" not in done.step_state()["attrs"]


def test_held_stops_wait_for_the_step_a_second_ctrl_c_does_not(sigterm_raises: None) -> None:
    from dorat.errors import Terminated
    from dorat.training.interrupts import HeldStops

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with HeldStops() as held:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)  # the process group's copy: still held
        assert held.pending == signal.SIGTERM
        with pytest.raises(Terminated):
            held.stop()  # as the process's own handler does
        assert signal.getsignal(signal.SIGTERM) == before[0]  # released by the raise
        held.hold()
        signal.raise_signal(signal.SIGINT)
        assert held.pending == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C: at once
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    held = HeldStops()
    held.hold()
    signal.raise_signal(signal.SIGTERM)  # after the loop's last look at it
    with pytest.raises(Terminated):
        held.release()  # delivered, not lost
    assert signal.getsignal(signal.SIGTERM) == before[0]


def test_a_requeue_signal_waits_for_the_batch_like_submitits(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit requeues a Slurm job on SIGUSR2 and ends it with sys.exit: held like SIGTERM
    (compare's slurm jobs call also_hold), so the requeued job resumes within the epoch."""
    from conftest import make_synthetic_npz
    from dorat.training import interrupts, trainer

    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=192, n_test=40)
    cfg = C.resolve(None, {"dataset": f"npz:{npz}", "method": "wat", "epochs": 2, "batch_size": 32},
                    ["attack.steps=2", "eval.n=20", "eval.checks=false", "eval.steps=1",
                     "data.val_size=64", "val.n=32", "val.steps=1"])
    train(cfg, tmp_path / "a", log=lambda s: None)

    def requeue(signum: int, frame: object) -> None:  # what submitit's handler does, in short
        raise SystemExit(-1)

    previous = signal.signal(signal.SIGUSR2, requeue)
    monkeypatch.setattr(interrupts, "_ALSO", set())
    interrupts.also_hold(signal.SIGUSR2)
    real, calls = trainer.Trainer.step, [0]

    def step(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        real(self, *a, **k)
        calls[0] += 1
        if calls[0] == 6:  # epoch 2 (of 4 batches), batch 2
            signal.raise_signal(signal.SIGUSR2)

    try:
        monkeypatch.setattr(trainer.Trainer, "step", step)
        with pytest.raises(SystemExit):
            train(cfg, tmp_path / "b", log=lambda s: None)
        assert signal.getsignal(signal.SIGUSR2) is requeue
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert load_state(tmp_path / "b" / "checkpoint.safetensors")[0]["mid_epoch"]["step"] == 2
    monkeypatch.setattr(trainer.Trainer, "step", real)
    train(cfg, tmp_path / "b", resume=True, log=lambda s: None)
    _same_run(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("damage", [
    lambda m: {**m, "ranks": 3},  # not a list
    lambda m: {**m, "ranks": []},  # another number of processes
    lambda m: {**m, "ranks": [{**m["ranks"][0], "gen": torch.zeros(3)}]},  # not a generator state
    lambda m: {**m, "ranks": [{**m["ranks"][0], "gen": torch.zeros(3, dtype=torch.uint8)}]},
    lambda m: {**m, "ranks": [{**m["ranks"][0], "stats": {"sums": 1}}]},
    lambda m: {**m, "ranks": [{**m["ranks"][0], "measured": [[1.0]]}]},
], ids=["ranks-not-a-list", "world", "gen", "gen-size", "stats", "measured"])
def test_a_damaged_mid_epoch_checkpoint_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture, damage) -> None:  # noqa: ANN001
    from conftest import make_synthetic_npz
    from dorat.files.checkpoint import save_state
    from dorat.training import trainer

    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=192, n_test=40)
    cfg = C.resolve(None, {"dataset": f"npz:{npz}", "method": "done", "epochs": 1, "batch_size": 64},
                    ["attack.steps=1", "eval.n=20", "eval.checks=false", "eval.steps=1",
                     "done.warmup=0", "log.checkpoint_minutes=1e-9"])
    real = trainer.Trainer.step
    calls = [0]

    def step(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("crash")
        real(self, *a, **k)

    monkeypatch.setattr(trainer.Trainer, "step", step)
    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "r", log=lambda s: None)
    ck = tmp_path / "r" / "checkpoint.safetensors"
    state = load_state(ck)[0]
    save_state(ck, {**state, "mid_epoch": damage(state["mid_epoch"])})
    monkeypatch.setattr(trainer.Trainer, "step", real)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dorat: error: checkpoint in ") and "does not fit this run" in err[-1]
