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
