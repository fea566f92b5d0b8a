"""CLI contract: user errors are one line on stderr, exit code 2, and nothing half-written."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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


def _idx_dir(tmp_path: Path, damage: str) -> Path:
    root = tmp_path / damage
    make_mnist_dir(root / "mnist")
    if damage == "truncated":
        p = root / "mnist" / "train-images-idx3-ubyte.gz"
        p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes())[:-100]))
    elif damage == "corrupt-header":
        p = root / "mnist" / "train-labels-idx1-ubyte.gz"
        p.write_bytes(gzip.compress(b"\x07\x07" + gzip.decompress(p.read_bytes())[2:]))
    elif damage == "bad-gzip":
        p = root / "mnist" / "t10k-images-idx3-ubyte.gz"
        p.write_bytes(p.read_bytes()[:40])
    elif damage == "missing":
        (root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    return root


def _npz(tmp_path: Path, hw: int = 12, k: int = 4, **change: np.ndarray | None) -> str:
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "x_train": rng.integers(0, 256, (40, hw, hw), dtype=np.uint8), "y_train": np.arange(40) % k,
        "x_test": rng.integers(0, 256, (20, hw, hw), dtype=np.uint8), "y_test": np.arange(20) % k}
    for k, v in change.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    path = tmp_path / "user.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def _yaml(tmp_path: Path, text: str) -> str:
    (tmp_path / "c.yaml").write_text(text)
    return str(tmp_path / "c.yaml")


NAN = np.full((40, 12, 12), np.nan, dtype=np.float32)
# id -> (argv builder(tmp_path, finished_run_dir), substring of the one-line message)
MATRIX: dict[str, tuple] = {
    # datasets
    "idx-truncated": (lambda t, r: ["train", "--dataset", "mnist", "--data-dir",
                                    str(_idx_dir(t, "truncated")), "--set", "data.download=false"],
                      "truncated"),
    "idx-corrupt-header": (lambda t, r: ["train", "--dataset", "mnist", "--data-dir",
                                         str(_idx_dir(t, "corrupt-header")), "--set",
                                         "data.download=false"], "no valid IDX header"),
    "idx-bad-gzip": (lambda t, r: ["train", "--dataset", "mnist", "--data-dir",
                                   str(_idx_dir(t, "bad-gzip")), "--set", "data.download=false"],
                     "mnist"),
    "idx-missing-file": (lambda t, r: ["train", "--dataset", "mnist", "--data-dir",
                                       str(_idx_dir(t, "missing")), "--set", "data.download=false"],
                         "is not on this machine"),
    "npz-missing-file": (lambda t, r: ["train", "--dataset", f"npz:{t}/none.npz"], "does not exist"),
    "npz-missing-array": (lambda t, r: ["train", "--dataset", _npz(t, x_test=None)], "lacks arrays x_test"),
    "npz-float-0-255": (lambda t, r: ["train", "--dataset", _npz(t, x_train=np.full((40, 12, 12), 200.0))],
                        "holds floats outside [0, 1]"),
    "npz-int-dtype": (lambda t, r: ["train", "--dataset", _npz(t, x_train=np.zeros((40, 12, 12), np.int16))],
                      "has dtype int16; uint8 pixels"),
    "npz-nan-pixels": (lambda t, r: ["train", "--dataset", _npz(t, x_train=NAN)], "floats outside [0, 1]"),
    "npz-wrong-shape": (lambda t, r: ["train", "--dataset", _npz(t, x_train=np.zeros(40, np.uint8))],
                        "must be N×H×W or N×H×W×C"),
    "npz-label-count": (lambda t, r: ["train", "--dataset", _npz(t, y_train=np.zeros(7, np.int64))],
                        "one label per image"),
    "npz-negative-labels": (lambda t, r: ["train", "--dataset",
                                          _npz(t, y_train=np.arange(40) % 4 - 1)], "negative labels"),
    "npz-empty": (lambda t, r: ["train", "--dataset", _npz(t, x_train=np.zeros((0, 12, 12), np.uint8),
                                                            y_train=np.zeros(0, np.int64))],
                  "has an empty train split"),
    "unknown-dataset": (lambda t, r: ["train", "--dataset", "imagenet-xyz"], "unknown dataset 'imagenet-x"),
    # configs and flags
    "unknown-method": (lambda t, r: ["train", "--method", "nope"], "unknown method 'nope'"),
    "unknown-model": (lambda t, r: ["train", "--model", "vgg99"], "unknown model 'vgg99'"),
    "eps-negative": (lambda t, r: ["train", "--set", "attack.eps=-0.1"], "attack.eps' must be in [0, 1]"),
    "eps-above-1": (lambda t, r: ["train", "--set", "attack.eps=1.5"], "attack.eps' must be in [0, 1]"),
    "steps-zero": (lambda t, r: ["train", "--set", "attack.steps=0"], "attack.steps' must be > 0"),
    "r-zero": (lambda t, r: ["train", "--method", "done", "--set", "done.r=0"], "done.r' must be > 0"),
    "r-negative": (lambda t, r: ["train", "--set", "done.r=-1"], "done.r' must be > 0"),
    "beta-zero": (lambda t, r: ["train", "--set", "done.beta=0"], "done.beta' must be in (0, 1]"),
    "beta-above-1": (lambda t, r: ["train", "--set", "done.beta=1.5"], "done.beta' must be in (0, 1]"),
    "unknown-key": (lambda t, r: ["train", "--set", "attack.epz=0.1"],
                    "unknown config key 'attack.epz'. Did you mean: attack.eps"),
    "unknown-key-in-yaml": (lambda t, r: ["train", "--config", _yaml(t, "optim:\n  lrr: 0.1\n")],
                            "unknown config key 'optim.lrr'"),
    "invalid-yaml": (lambda t, r: ["train", "--config", _yaml(t, "epochs: [1\n")], "not valid YAML"),
    "wrong-type": (lambda t, r: ["train", "--set", "optim.lr=abc"], "optim.lr' must be float"),
    "batch-size-zero": (lambda t, r: ["train", "--set", "batch_size=0"], "batch_size' must be > 0"),
    "unknown-attack": (lambda t, r: ["train", "--set", "eval.attacks=pgd,fab"], "unknown attack(s) fab"),
    "imbalance-below-1": (lambda t, r: ["train", "--set", "data.imbalance_ratio=0.5"], "must be >= 1"),
    "no-such-preset": (lambda t, r: ["train", "--config", "no-such-preset"], "neither a file nor a preset"),
    # run directories and checkpoints
    "finished-run-dir": (lambda t, r: ["train", "--dataset", f"npz:{t}/../toy.npz", "--out", str(r)],
                         "already holds a finished run"),
    "out-is-a-file": (lambda t, r: ["train", "--out", str(r / "config.yaml")], "is not a directory"),
    "out-unwritable": (lambda t, r: ["train", "--dataset", f"npz:{t}/../toy.npz", "--out",
                                     str(r / "metrics.json" / "sub")], "cannot create output directory"),
    "resume-nothing": (lambda t, r: ["train", "--out", str(t / "empty"), "--resume"], "nothing to resume"),
    "eval-not-a-run": (lambda t, r: ["eval", str(t / "norun")], "is not a dorat run"),
    "eval-out-dir-missing": (lambda t, r: ["eval", str(r), "--out", str(t / "no" / "e.json")],
                             "does not exist"),
    "eval-n-zero": (lambda t, r: ["eval", str(r), "--n", "0"], "eval.n' must be > 0"),
    "checkpoint-other-model": (lambda t, r: ["eval", str(_swap(r, "model: small-cnn",
                                                                "model: preact-resnet18"))],
                               "does not fit this model"),
    "checkpoint-other-dataset": (lambda t, r: ["eval", str(_swap(r, f"dataset: npz:{t}/../toy.npz",
                                                                  f"dataset: {_npz(t, hw=28, k=7)}"))],
                                 "does not fit this model"),
    "checkpoint-truncated": (lambda t, r: ["train", "--out", str(_truncate_ckpt(r)), "--resume"],
                             "is not a readable safetensors file"),
    "report-unfinished": (lambda t, r: ["report", str(_unfinish(r)), "--out", str(t / "rep")],
                          "has no metrics.json"),
    "compare-bad-file": (lambda t, r: ["compare", _yaml(t, "methods: [at]\nseedz: [1]\n"), "--out",
                                       str(t / "cmp")], "unknown key(s) seedz"),
    "compare-bad-yaml": (lambda t, r: ["compare", _yaml(t, "methods:\n  - at\nseeds: [0]\n  - done\n"),
                                       "--out", str(t / "cmp")], "not valid YAML at line 4, column 3"),
    "data-fetch-unknown": (lambda t, r: ["data", "fetch", "imagenet-xyz"], "unknown dataset"),
}


def _swap(run: Path, old: str, new: str) -> Path:
    cfg = (run / "config.yaml").read_text()
    assert old in cfg, (old, cfg)
    (run / "config.yaml").write_text(cfg.replace(old, new))
    return run


def _truncate_ckpt(run: Path) -> Path:
    (run / "metrics.json").unlink()
    p = run / "checkpoint.safetensors"
    p.write_bytes(p.read_bytes()[:200])
    return run


def _unfinish(run: Path) -> Path:
    (run / "metrics.json").unlink()
    return run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_synthetic_npz

    d = tmp_path_factory.mktemp("matrix")
    npz = make_synthetic_npz(d / "toy.npz", n_train=128, n_test=40)
    assert main(["train", "--dataset", f"npz:{npz}", "--epochs", "1", "--out", str(d / "run"),
                 "--set", "attack.steps=1", "--set", "eval.n=20", "--set", "eval.checks=false"]) == 0
    return d / "run"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(MATRIX))
def test_bad_input_matrix(case: str, tmp_path: Path, finished_run: Path,
                          capsys: pytest.CaptureFixture) -> None:
    """Each bad input: exit 2, one line `dorat: error: ...` naming the problem, and no output
    written (the tree under tmp_path is unchanged apart from what the case itself set up)."""
    import shutil

    work = tmp_path / "w"
    work.mkdir()
    shutil.copy(finished_run.parent / "toy.npz", tmp_path / "toy.npz")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    cfg = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(cfg.replace(str(finished_run.parent / "toy.npz"),
                                                 str(work / ".." / "toy.npz")))
    build, needle = MATRIX[case]
    argv = build(work, run)
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = _snapshot(tmp_path)
    code, out, err = _run(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("dorat: error: "), (argv, err)
    assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before, "the failed command wrote or changed files"
    assert not (tmp_path / "out").exists()


def test_matrix_is_big_enough() -> None:
    assert len(MATRIX) >= 25


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
