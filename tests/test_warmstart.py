"""Starting from trained weights (`init`) and weight averaging (`optim.ema`): what a run starts
from is recorded and checked, a mismatch is one line naming the tensor, the average is the
reference code's (ramped decay, BatchNorm statistics copied), everything downstream of training
uses it, and both resume bitwise (mid-epoch: tests/test_reliability.py MID_EPOCH)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from dorat import config as C
from dorat.errors import ConfigError
from dorat.files.checkpoint import load_state
from dorat.models.averaging import EMA, fold
from dorat.runs.run import train

SETS = ["attack.steps=1", "eval.n=20", "eval.checks=false", "eval.steps=2"]


def _cfg(npz: Path, **flags: object) -> C.Config:
    sets = [*SETS, *flags.pop("sets", [])]  # type: ignore[misc]
    return C.resolve(None, {"dataset": f"npz:{npz}", "epochs": 1, "batch_size": 64, **flags}, sets)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from conftest import make_synthetic_npz

    d = tmp_path_factory.mktemp("init")
    npz = make_synthetic_npz(d / "toy.npz", n_train=192, n_test=40)
    train(_cfg(npz, method="at"), d / "base", log=lambda s: None)
    return npz, d / "base"


def test_init_from_a_run_a_safetensors_file_or_a_state_dict(trained: tuple[Path, Path],
                                                            tmp_path: Path) -> None:
    from dorat.evaluation.card import sha256
    from dorat.runs.run import load_run

    npz, base = trained
    weights = load_file(base / "model.safetensors")
    torch.save(weights, tmp_path / "w.pt")
    for init in (base, base / "model.safetensors", tmp_path / "w.pt"):
        out = tmp_path / f"ft-{Path(init).name}"
        lines: list[str] = []
        # 1 epoch at lr 0 (constant): the run's model is exactly the init's weights
        train(_cfg(npz, method="at", init=str(init), sets=["optim.lr=1e-30", "optim.schedule=constant",
                                                           "optim.weight_decay=0", "optim.momentum=0"]),
              out, log=lines.append)
        rec = json.loads((out / "init.json").read_text())
        assert rec["sha256"] == sha256(Path(rec["file"])) and Path(rec["init"]).is_absolute()
        assert any(line.startswith("starting from ") for line in lines)
        got = load_run(out).model.state_dict()
        assert all(torch.allclose(got[k].float(), weights[k].float())
                   for k in weights if "num_batches" not in k)


def test_init_errors_are_one_line(trained: tuple[Path, Path], tmp_path: Path) -> None:
    npz, base = trained
    with pytest.raises(ConfigError, match="does not exist"):
        train(_cfg(npz, init=str(tmp_path / "missing")), tmp_path / "a", log=lambda s: None)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(ConfigError, match="without model.safetensors"):
        train(_cfg(npz, init=str(tmp_path / "unfinished")), tmp_path / "b", log=lambda s: None)
    w = load_file(base / "model.safetensors")
    first = next(k for k in w if w[k].dim() == 4)
    w[first] = torch.zeros(3, *w[first].shape[1:])
    save_file(w, tmp_path / "bad.safetensors")
    with pytest.raises(ConfigError, match=rf"init: .*shape of {first} is \(3, .*model needs"):
        train(_cfg(npz, init=str(tmp_path / "bad.safetensors")), tmp_path / "c", log=lambda s: None)
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def _stopped(cfg: C.Config, out: Path, step: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train ``cfg`` into ``out`` with Trainer.step replaced by ``step``, which stops the run (a
    SIGTERM handled as the CLI handles it, or Terminated itself)."""
    from dorat.errors import Terminated, raise_terminated
    from dorat.training import trainer

    real = trainer.Trainer.step
    monkeypatch.setattr(trainer.Trainer, "step", step)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with pytest.raises(Terminated):
            train(cfg, out, log=lambda s: None)
    finally:
        signal.signal(signal.SIGTERM, previous)
        monkeypatch.setattr(trainer.Trainer, "step", real)


def test_a_restart_refuses_an_init_file_that_changed(trained: tuple[Path, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from dorat.errors import Terminated

    npz, base = trained
    init = tmp_path / "w.safetensors"
    init.write_bytes((base / "model.safetensors").read_bytes())
    cfg = _cfg(npz, init=str(init))

    def stop(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        raise Terminated  # before the first batch is done: no checkpoint yet

    _stopped(cfg, tmp_path / "run", stop, monkeypatch)
    assert (tmp_path / "run" / "init.json").is_file()
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()
    w = load_file(init)
    w = {k: v + 1 if v.is_floating_point() else v for k, v in w.items()}
    save_file(w, init)
    with pytest.raises(ConfigError, match="changed since this run started from it"):
        train(cfg, tmp_path / "run", resume=True, log=lambda s: None)


def test_ema_follows_the_reference_update() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.9, start=0, epochs=1, steps_per_epoch=10)
    assert [ema.decay_at(t) for t in (0, 1, 2, 100)] == pytest.approx([0.1, 2 / 11, 3 / 12, 0.9])
    expect = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(5):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model.train()
        model(torch.randn(8, 3))  # moves BatchNorm's running statistics
        ema.update(model, t)
        d = ema.decay_at(t)
        expect["0.weight"] = d * expect["0.weight"] + (1 - d) * model[0].weight.detach()
    avg = ema.sync().state_dict()
    assert torch.allclose(avg["0.weight"], expect["0.weight"])
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):  # copied, not averaged
        assert torch.equal(avg[k], model.state_dict()[k])
    late = EMA(model, decay=0.9, start="50%", epochs=2, steps_per_epoch=10)
    assert late.decay_at(9) == 0.0 and late.decay_at(10) == pytest.approx(0.1)
    # FAWA's use: every floating entry averaged
    a = fold(None, model, 0.5, buffers="average")
    before = a["1.running_mean"].clone()
    model(torch.randn(8, 3) + 5)
    fold(a, model, 0.5, buffers="average")
    assert torch.allclose(a["1.running_mean"], 0.5 * before + 0.5 * model[1].running_mean)


def test_ema_is_what_the_run_ends_with_and_judges(trained: tuple[Path, Path], tmp_path: Path) -> None:
    npz, _ = trained
    cfg = _cfg(npz, method="at", epochs=2, sets=["optim.ema=0.5", "val.keep_best=ra_pgd",
                                                   "data.val_size=40", "val.n=40", "val.steps=1"])
    lines: list[str] = []
    train(cfg, tmp_path / "r", log=lines.append)
    state = load_state(tmp_path / "r" / "checkpoint.safetensors")[0]
    final = load_file(tmp_path / "r" / "model.safetensors")
    assert all(torch.equal(final[k], state["ema"][k]) for k in final)
    assert not all(torch.equal(final[k], state["model"][k]) for k in final)  # not the last weights
    assert any("the final model is the weight average" in line for line in lines)
    log = [json.loads(x) for x in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert all("val_ra_pgd" in r for r in log) and (tmp_path / "r" / "best.safetensors").is_file()
    assert train(cfg, tmp_path / "half", stop_after_epoch=1, log=lambda s: None) is None
    with pytest.raises(ConfigError, match="--resume cannot change optim.ema"):
        train(cfg, tmp_path / "half", resume=True, log=lambda s: None, changes={"optim.ema": 0.9})
    with pytest.raises(ConfigError, match="cfa.fawa and optim.ema"):
        C.resolve(None, {"dataset": f"npz:{npz}", "method": "at-cfa"}, ["optim.ema=0.99"])


def test_fit_takes_init_like_the_cli(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import numpy as np

    import dorat

    npz, base = trained
    with np.load(npz) as f:
        x, y = f["x_train"], f["y_train"]
    from dorat.models.nets import SmallCNN

    fitted = dorat.fit(SmallCNN(1, 28, 4), (x, y), method="at", out=tmp_path / "fit", epochs=1,
                       init=str(base), set={"attack.steps": 1, "eval.n": 20, "eval.checks": False,
                                            "eval.steps": 2}, log=lambda s: None)
    assert json.loads((fitted.run_dir / "init.json").read_text())["file"].endswith("model.safetensors")


def test_faal_from_init_resumes_bitwise_after_a_stop_mid_epoch(
        trained: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    from dorat.training import trainer
    from test_reliability import _same_run

    npz, base = trained
    cfg = _cfg(npz, method="faal", epochs=2, init=str(base), sets=["optim.ema=0.8"])
    train(cfg, tmp_path / "a", log=lambda s: None)
    real, calls = trainer.Trainer.step, [0]

    def step(self, *a, **k) -> None:  # noqa: ANN001, ANN002, ANN003
        real(self, *a, **k)
        calls[0] += 1
        if calls[0] == 4:  # epoch 2 (of 3 batches each), batch 1
            signal.raise_signal(signal.SIGTERM)

    _stopped(cfg, tmp_path / "b", step, monkeypatch)
    assert load_state(tmp_path / "b" / "checkpoint.safetensors")[0]["mid_epoch"]["step"] == 1
    train(cfg, tmp_path / "b", resume=True, log=lambda s: None)
    _same_run(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "init.json").read_text() == (tmp_path / "b" / "init.json").read_text()
