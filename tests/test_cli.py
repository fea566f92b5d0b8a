"""CLI contract: user errors are one line on stderr, exit code 2, and nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli as _run
from dorat.cli import main


def test_argparse_errors_are_one_line_too(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--epochs", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dorat: error:")


def test_train_eval_roundtrip_through_cli(tmp_path: Path, capsys: pytest.CaptureFixture,
                                         synthetic_npz: Path) -> None:
    run = tmp_path / "run"
    code, out, err = _run(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1",
                          "--out", str(run), "--set", "attack.steps=2", "--set", "eval.n=40")
    assert code == 0 and "RA-PGD" in out and (run / "metrics.json").exists()
    code, out, err = _run(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1",
                          "--out", str(run))
    assert code == 2 and "already holds a finished run" in err
    code, out, err = _run(capsys, "eval", str(run), "--attacks", "pgd,cw", "--n", "20",
                          "--out", str(tmp_path / "e.json"))
    assert code == 0, err
    m = json.loads((tmp_path / "e.json").read_text())
    assert set(m["ra"]) == {"pgd", "cw", "worst"} and m["n"] == 20
    # stopped in the middle (here after PGD's batch): the same command goes on from its journal
    import dorat.evaluation.evaluate as E

    real, calls = E._attack_batch, []

    def attack(*a, **k):  # noqa: ANN002, ANN003, ANN202
        calls.append(a[1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    again = ["eval", str(run), "--attacks", "pgd,cw", "--n", "20", "--out", str(tmp_path / "f.json")]
    E._attack_batch = attack
    try:
        code, out, err = _run(capsys, *again)
        assert code == 130 and "run the same command again to continue where the attacks stopped" in err
        assert (tmp_path / ".f.json.partial.safetensors").is_file() and not (tmp_path / "f.json").exists()
        code, out, err = _run(capsys, *again)
    finally:
        E._attack_batch = real
    assert code == 0 and "resuming the evaluation after 2 of 3" in err  # clean, PGD; not CW
    assert calls[:3] == ["pgd", "cw", "cw"], calls  # then the sanity checks' PGD sweep
    f = json.loads((tmp_path / "f.json").read_text())
    assert {k: v for k, v in f.items() if k != "eval_seconds"} == {
        k: v for k, v in m.items() if k != "eval_seconds"}  # what the uninterrupted one gave
    assert not (tmp_path / ".f.json.partial.safetensors").exists()
    code, out, err = _run(capsys, "eval", str(run), "--attacks", "pgd,fab")
    assert code == 2 and "unknown attack(s) fab" in err
    code, out, err = _run(capsys, "eval", str(run), "--out", str(tmp_path / "no" / "dir.json"))
    assert code == 2 and "does not exist" in err


def test_eval_refuses_weights_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               synthetic_npz: Path) -> None:
    run = tmp_path / "run"
    assert _run(capsys, "train", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1", "--out",
                str(run), "--set", "attack.steps=1", "--set", "eval.n=20")[0] == 0
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace("model: small-cnn", "model: preact-resnet18"))
    code, _, err = _run(capsys, "eval", str(run))
    assert code == 2 and "does not fit this model" in err


def test_console_entry_point_runs() -> None:
    r = subprocess.run([sys.executable, "-m", "dorat", "train", "--list-keys"], capture_output=True,
                       text=True, check=True)
    assert "attack.eps: float = 0.1  # threat radius" in r.stdout
    assert "method.weighting: str = 'uniform'" in r.stdout and "done.warmup: epochs|N% = 1" in r.stdout
