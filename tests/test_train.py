"""Training loop: resume equals an uninterrupted run; schedules; checkpoints without pickle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dorat import config as C
from dorat.errors import CheckpointError, ConfigError
from dorat.files.checkpoint import load_state, pack, save_state, unpack
from dorat.runs.run import train
from dorat.training.trainer import lr_lambda


def _cfg(npz: Path, *sets: str) -> dict:
    return C.resolve(None, {"dataset": f"npz:{npz}", "epochs": 3, "batch_size": 64},
                     ["attack.steps=2", "attack.alpha=0.05", "eval.n=40", "eval.steps=2",
                      "optim.lr=0.02", *sets])


def test_resume_after_epoch_1_equals_uninterrupted(tmp_path: Path, synthetic_npz: Path) -> None:
    cfg = _cfg(synthetic_npz, "data.augment=crop-flip")
    full = train(cfg, tmp_path / "full", log=lambda s: None)
    assert train(cfg, tmp_path / "part", stop_after_epoch=1, log=lambda s: None) is None
    assert not (tmp_path / "part" / "model.safetensors").exists()
    resumed = train(cfg, tmp_path / "part", resume=True, log=lambda s: None)
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full == {**resumed, "eval_seconds": full["eval_seconds"]}
    log_full = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    log_part = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log_part] == [1, 2, 3]
    assert [r["loss"] for r in log_full] == [r["loss"] for r in log_part]


def test_log_lines_and_run_dir_contents(tmp_path: Path, synthetic_npz: Path) -> None:
    train(_cfg(synthetic_npz, "epochs=2"), tmp_path / "r", log=lambda s: None)
    files = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert files == ["checkpoint.safetensors", "config.yaml", "log.jsonl", "metrics.json",
                     "model.safetensors", "weights.safetensors"]
    rec = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[-1])
    for key in ("epoch", "loss", "train_acc_clean", "train_acc_adv", "lr", "seconds", "cpu_seconds",
                "examples_per_s", "ess", "w_max", "w_class_mean"):
        assert key in rec
    assert rec["ess"] == pytest.approx(1.0) and rec["w_max"] == pytest.approx(1.0)
    w, _ = load_state(tmp_path / "r" / "weights.safetensors")
    assert set(w) == {"w", "y", "loss", "idx"} and len(w["w"]) == 512  # every training example once
    assert sorted(w["idx"].tolist()) == list(range(512))
    saved = C.load_yaml(str(tmp_path / "r" / "config.yaml"))[0]
    assert saved["epochs"] == 2 and saved["attack"]["steps"] == 2
    # the model learned the toy task
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert m["sa"] > 0.9
    # which machine computed them: numbers are compared on one machine only
    assert rec["machine"] == m["machine"] and m["machine"]["torch"] == torch.__version__
    assert m["machine"]["cpu"] and m["machine"]["threads"] == torch.get_num_threads()


def test_finished_run_dir_is_refused_without_overwrite(tmp_path: Path, synthetic_npz: Path) -> None:
    cfg = _cfg(synthetic_npz, "epochs=1")
    train(cfg, tmp_path / "r", log=lambda s: None)
    with pytest.raises(ConfigError, match="already holds a finished run"):
        train(cfg, tmp_path / "r", log=lambda s: None)
    assert train(cfg, tmp_path / "r", overwrite=True, log=lambda s: None) is not None
    assert (tmp_path / "r" / "metrics.json").is_file() and not (tmp_path / "r" / ".next").exists()


@pytest.mark.parametrize("schedule", ["piecewise", "cosine", "onecycle", "constant"])
def test_lr_schedules(schedule: str) -> None:
    f = lr_lambda(schedule, 100, [0.5, 0.75], 0.1)
    values = [f(t) for t in range(101)]
    assert all(0 <= v <= 1 + 1e-12 for v in values)
    if schedule == "piecewise":
        assert values[49] == 1 and values[50] == pytest.approx(0.1) and values[75] == pytest.approx(0.01)
    if schedule == "cosine":
        assert values[0] == 1 and values[50] == pytest.approx(0.5) and values[100] == pytest.approx(0)
    if schedule == "onecycle":
        assert values[0] == 0 and values[40] == pytest.approx(1) and values[100] == pytest.approx(0)


def test_checkpoint_roundtrip_without_pickle(tmp_path: Path) -> None:
    state = {"epoch": 3, "w": torch.randn(3, 2), "nested": {0: {"buf": torch.arange(4)}, "lr": 0.1},
             "groups": [{"params": [0, 1], "nesterov": False}], "t": (1, 2.5), "none": None,
             "inf": float("inf")}
    save_state(tmp_path / "c.safetensors", state)
    back, meta = load_state(tmp_path / "c.safetensors")
    assert back["epoch"] == 3 and torch.equal(back["w"], state["w"])
    assert torch.equal(back["nested"][0]["buf"], torch.arange(4)) and 0 in back["nested"]
    assert back["groups"] == state["groups"] and back["t"] == (1, 2.5) and back["inf"] == float("inf")
    tensors: dict = {}
    assert unpack(pack(state["groups"], tensors), tensors) == state["groups"]
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "c.safetensors").read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a readable"):
        load_state(tmp_path / "bad.safetensors")
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_eval_on_held_out_validation_split(tmp_path: Path, synthetic_npz: Path) -> None:
    m = train(_cfg(synthetic_npz, "epochs=1", "data.val_size=60", "eval.split=val", "eval.n=null"),
              tmp_path / "v", log=lambda s: None)
    assert m["split"] == "val" and m["n"] == 60
    with pytest.raises(ConfigError, match="data.val_size"):
        train(_cfg(synthetic_npz, "epochs=1", "eval.split=val"), tmp_path / "w", log=lambda s: None)
    assert not (tmp_path / "w").exists()


def test_outputs_get_normal_file_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from dorat.files.checkpoint import save_state, save_weights, write_text_atomic

    write_text_atomic(tmp_path / "a.txt", "x")
    save_state(tmp_path / "s.safetensors", {"t": torch.zeros(2), "epoch": 1})
    save_weights(tmp_path / "w.safetensors", torch.nn.Linear(2, 2))
    umask = os.umask(0)
    os.umask(umask)
    for name in ("a.txt", "s.safetensors", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("opts", [["perf.channels_last=off"], ["perf.amp=bf16"],
                                  ["perf.compile=true", "perf.compile_backend=eager"],
                                  ["perf.channels_last=on", "perf.amp=bf16", "method=done",
                                   "done.warmup=0"], ["perf.deterministic=true"]])
def test_gpu_options_train_correctly_on_cpu(tmp_path: Path, synthetic_npz: Path, opts: list[str]) -> None:
    """NCHW vs channels_last (the default on CPU), bf16 autocast and torch.compile change speed,
    not the method: each trains to about the default run's accuracy, and the saved weights load
    into a plain model."""
    plain = train(_cfg(synthetic_npz, "epochs=2"), tmp_path / "plain", log=lambda s: None)
    m = train(_cfg(synthetic_npz, "epochs=2", *opts), tmp_path / "opt", log=lambda s: None)
    assert m is not None and plain is not None
    log = [json.loads(line) for line in (tmp_path / "opt" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in log)
    assert m["sa"] > 0.5 and abs(m["sa"] - plain["sa"]) < 0.15
    from dorat.runs.run import load_run

    run = load_run(tmp_path / "opt", "cpu")  # plain module: no "_orig_mod." keys, NCHW input ok
    assert not any("_orig_mod" in k for k in run.model.state_dict())
    torch.use_deterministic_algorithms(False)  # perf.deterministic sets a process-wide flag


def test_parallel_settings_are_checked() -> None:
    from dorat.runs.run import _check_parallel
    from dorat.system.distributed import Dist

    two = Dist(rank=0, world=2)
    with pytest.raises(ConfigError, match="divisible"):
        _check_parallel(C.resolve(None, {"batch_size": 65}), two)
    with pytest.raises(ConfigError, match="hypergradient"):
        _check_parallel(C.resolve(None, {"method": "done-cid", "batch_size": 64}), two)
    _check_parallel(C.resolve(None, {"method": "done", "batch_size": 64}), two)
    _check_parallel(C.resolve(None, {"method": "done-cid", "batch_size": 65}), Dist())


def test_amp_auto_follows_the_device_and_bf16_keeps_the_ball_and_the_normaliser_exact(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """perf.amp=auto is bf16 only where the device computes it natively; under bf16 autocast the
    attack's iterate and projection stay fp32 (the ε-ball is exact) and DONE's normaliser is
    computed in float64."""
    from dorat.attacks import PGDSpec, pgd
    from dorat.models import build_model
    from dorat.objectives.done import global_logmeanexp
    from dorat.system import runtime

    for native in (True, False):
        monkeypatch.setattr(runtime, "bf16_native", lambda device_type, cpuinfo=None, n=native: n)
        assert runtime.use_bf16("auto", "cpu") is native
        assert runtime.use_bf16("bf16", "cpu") and not runtime.use_bf16("off", "cpu")
    torch.manual_seed(0)
    model = build_model("small-cnn", 1, 28, 10).eval()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = pgd(model, x, y, PGDSpec(eps=0.1, alpha=0.025, steps=3))
        assert model(x).dtype == torch.bfloat16  # the forward pass does run in bf16
        lme = global_logmeanexp(res.loss.to(torch.bfloat16))
    assert res.x_adv.dtype == torch.float32
    assert float((res.x_adv - x).abs().max()) <= 0.1 + 1e-7
    assert float(res.x_adv.min()) >= 0 and float(res.x_adv.max()) <= 1
    assert lme.dtype == torch.float64
