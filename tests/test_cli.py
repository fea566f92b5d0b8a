"""CLI contract: user errors are one line on stderr, exit code 2, and nothing half-written."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_mnist_dir
from dorat.cli import main


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _mnist(tmp_path: Path) -> Path:
    make_mnist_dir(tmp_path / "data" / "mnist", n_train=40, n_test=20)
    return tmp_path / "data"


def _bad_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    data = _mnist(tmp_path)
    trunc = tmp_path / "trunc"
    make_mnist_dir(trunc / "mnist")
    p = trunc / "mnist" / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100]))
    corrupt = tmp_path / "corrupt"
    make_mnist_dir(corrupt / "mnist")
    p = corrupt / "mnist" / "train-labels-idx1-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(b"\x07\x07" + raw[2:]))
    missing = tmp_path / "missing"
    make_mnist_dir(missing / "mnist")
    (missing / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    base = ["train", "--dataset", "mnist", "--data-dir", str(data), "--epochs", "1"]
    return [
        (base + ["--method", "nope"], "unknown method 'nope'"),
        (["train", "--dataset", "imagenet-xyz", "--epochs", "1"], "unknown dataset 'imagenet-xyz'"),
        (base + ["--model", "vgg99"], "unknown model 'vgg99'"),
        (base + ["--set", "attack.eps=-0.1"], "attack.eps' must be in [0, 1]"),
        (base + ["--set", "attack.epz=0.1"], "unknown config key 'attack.epz'. Did you mean: attack.eps"),
        (base + ["--set", "attack.steps=0"], "attack.steps' must be > 0"),
        (base + ["--set", "optim.lr=abc"], "optim.lr' must be float"),
        (["train", "--dataset", "mnist", "--data-dir", str(trunc), "--set", "data.download=false"],
         "truncated"),
        (["train", "--dataset", "mnist", "--data-dir", str(corrupt), "--set", "data.download=false"],
         "no valid IDX header"),
        (["train", "--dataset", "mnist", "--data-dir", str(missing), "--set", "data.download=false"],
         "is not on this machine"),
        (["train", "--dataset", f"npz:{tmp_path}/none.npz"], "does not exist"),
        (["train", "--config", "no-such-preset"], "neither a file nor a preset"),
        (["eval", str(tmp_path / "norun")], "is not a dorat run"),
        (["data", "fetch", "imagenet-xyz"], "unknown dataset"),
    ]


def test_user_errors_are_one_line_exit_2_and_write_nothing(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    for argv, needle in _bad_cases(tmp_path):
        out_dir = tmp_path / "out"
        code, out, err = _run(capsys, *argv, *(["--out", str(out_dir)] if argv[0] == "train" else []))
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (argv, err)
        assert len(lines) == 1 and lines[0].startswith("dorat: error: "), (argv, err)
        assert needle in lines[0], (needle, lines[0])
        assert "Traceback" not in err
        assert not out_dir.exists(), (argv, list(out_dir.iterdir()))


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
    assert "attack.eps = 0.1" in r.stdout
