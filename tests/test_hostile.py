"""The hostile-input matrix: every bad input a careless or hostile user can give, one row each.

Each row is a command line built from a scratch directory and a finished run (copied per case),
the substring of the one-line message it must print, and what must hold afterwards: exit 2, one
line `dorat: error: ...`, no traceback, and no file written or changed anywhere under the scratch
directory (the earlier, finished run included). The fault tests (kill -9, SIGTERM, a full disk,
two processes on one run directory) are in test_reliability.py and test_locks.py."""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_mnist_dir, run_cli
from dorat.cli import main


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


def _plugin(source: str) -> str:
    """A plug-in module outside the scratch tree (its import writes nothing there), on sys.path."""
    import sys
    import tempfile

    d = tempfile.mkdtemp(prefix="dorat-plugin-")
    name = f"plug_{abs(hash(source)) % 10**8}"
    Path(d, f"{name}.py").write_text(source)
    sys.path.insert(0, d)
    return name


def _grid(t: Path, methods: str, extra: str = "") -> str:
    return _yaml(t, f"set: {{dataset: 'npz:{t}/../toy.npz'}}\nmethods: {methods}\n{extra}")


def _folder(t: Path, splits: tuple[str, ...] = ("train", "test"), junk: bool = False) -> str:
    from PIL import Image

    for s in splits:
        for c in ("a", "b"):
            (t / "imgs" / s / c).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(t / "imgs" / s / c / "0.png")
    if junk:
        (t / "imgs" / "train" / "a" / "1.png").write_bytes(b"not a png")
    return f"imagefolder:{t / 'imgs'}"


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
                  "the training split is empty"),
    "unknown-dataset": (lambda t, r: ["train", "--dataset", "imagenet-xyz"], "unknown dataset 'imagenet-x"),
    # configs and flags
    "unknown-method": (lambda t, r: ["train", "--method", "nope"], "unknown method 'nope'"),
    # resume: a flag is a change like --set (one rule), a finished run too, no contradiction
    "resume-flag-seed": (lambda t, r: ["train", "--out", str(_unfinish(r)), "--resume", "--seed", "9"],
                         "--resume cannot change seed"),
    "resume-flag-method": (lambda t, r: ["train", "--out", str(_unfinish(r)), "--resume", "--method",
                                         "done"], "--resume cannot change method.name"),
    "resume-flag-model": (lambda t, r: ["train", "--out", str(_unfinish(r)), "--resume", "--model",
                                        "vgg8-w16"], "--resume cannot change model"),
    "resume-flag-dataset": (lambda t, r: ["train", "--out", str(_unfinish(r)), "--resume", "--dataset",
                                          "mnist"], "--resume cannot change dataset"),
    "resume-flag-init": (lambda t, r: ["train", "--out", str(_unfinish(r)), "--resume", "--init",
                                       str(r / "model.safetensors")], "--resume cannot change init"),
    "resume-finished-change": (lambda t, r: ["train", "--out", str(r), "--resume", "--set",
                                             "method.weighting=kl-dro"],
                               "--resume cannot change method.weighting"),
    "resume-and-overwrite": (lambda t, r: ["train", "--out", str(r), "--resume", "--overwrite"],
                             "--resume and --overwrite contradict each other"),
    "resume-change-ema": (lambda t, r: ["train", "--out", str(_unfinish(r)), "--resume", "--set",
                                        "optim.ema=0.9"], "--resume cannot change optim.ema"),
    # init, weight averaging, FAAL
    "init-missing": (lambda t, r: ["train", "--dataset", f"npz:{t}/../toy.npz", "--init", str(t / "none")],
                     "does not exist"),
    "init-unfinished-run": (lambda t, r: ["train", "--dataset", f"npz:{t}/../toy.npz", "--init",
                                          str(t)], "without model.safetensors"),
    "init-other-model": (lambda t, r: ["train", "--dataset", f"npz:{t}/../toy.npz", "--model", "vgg8-w16",
                                       "--init", str(r)], "init: "),
    "init-pickle": (lambda t, r: ["train", "--dataset", f"npz:{t}/../toy.npz", "--init",
                                  str(_pickle_into(t, r, "w.pt") / "w.pt")], "needs code to load"),
    "ema-out-of-range": (lambda t, r: ["train", "--set", "optim.ema=1"], "must be in [0, 1)"),
    "ema-with-fawa": (lambda t, r: ["train", "--method", "at-cfa", "--set", "optim.ema=0.9"],
                      "cfa.fawa and optim.ema"),
    "faal-without-init": (lambda t, r: ["train", "--method", "faal"], "faal fine-tunes a trained model"),
    # image folders
    "imagefolder-missing": (lambda t, r: ["train", "--dataset", f"imagefolder:{t}/none"], "does not exist"),
    "imagefolder-no-test": (lambda t, r: ["train", "--dataset", _folder(t, ("train",))],
                            "has no test/ folder"),
    "imagefolder-unreadable": (lambda t, r: ["train", "--dataset", _folder(t, junk=True)],
                               "cannot read image"),
    # plug-ins: one line whatever the module does on import; presets keep their names
    "plugin-raises": (lambda t, r: ["train", "--plugin", _plugin("raise RuntimeError('boom')\n")],
                      "failed while being imported (RuntimeError: boom)"),
    "plugin-syntax-error": (lambda t, r: ["train", "--plugin", _plugin("def (:\n")],
                            "failed while being imported (SyntaxError"),
    "plugin-sys-exit": (lambda t, r: ["train", "--plugin", _plugin("import sys\nsys.exit(3)\n")],
                        "failed while being imported (SystemExit: 3)"),
    "plugin-replaces-preset": (lambda t, r: ["train", "--plugin", _plugin(
        "import dorat\ndorat.register_preset('at', attack='pgd', loss='ce', weighting='kl-dro')\n")],
        "a method preset named 'at' exists already"),
    # grid names never become paths; a tuning block is checked before anything runs
    "eval-model-steps-zero": (lambda t, r: [*_ext(t), "--steps", "0"], "--steps must be at least 1, got 0"),
    "eval-model-restarts-zero": (lambda t, r: [*_ext(t), "--restarts", "0"],
                                 "--restarts must be at least 1, got 0"),
    "eval-run-steps-zero": (lambda t, r: ["eval", str(r), "--steps", "0"], "--steps must be at least 1"),
    "compare-name-escape": (lambda t, r: ["compare", _grid(t, "[{name: ../../escape, method: at}]"),
                                          "--out", str(t / "cmp")], "is not a valid name"),
    "compare-name-dot": (lambda t, r: ["compare", _grid(t, "[{name: .hidden, method: at}]"),
                                       "--out", str(t / "cmp")], "is not a valid name"),
    "compare-setting-slash": (lambda t, r: ["compare", _grid(t, "[at]", "settings: {a/b: {}}"),
                                            "--out", str(t / "cmp")], "setting 'a/b' is not a valid"),
    "compare-space-without-tune": (lambda t, r: ["compare", _grid(
        t, "[{name: d, method: done, space: {done.r: '1:2'}}]"), "--out", str(t / "cmp")],
        "has a space but the file has no tune block"),
    "compare-tune-no-objective": (lambda t, r: ["compare", _grid(t, "[at]", "tune: {trials: 2}"),
                                                "--out", str(t / "cmp")], "tune needs objective"),
    "compare-tune-bad-trials": (lambda t, r: ["compare", _grid(
        t, "[at]", "tune: {trials: 0, objective: val.ra.pgd}"), "--out", str(t / "cmp")],
        "tune.trials must be an integer >= 1"),
    "compare-init-from-unknown": (lambda t, r: ["compare", _grid(
        t, "[at, {name: f, method: faal, init_from: nope}]"), "--out", str(t / "cmp")],
        "init_from must name another method"),
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
    "eval-not-a-run": (lambda t, r: ["eval", str(t / "norun")], "is not a dorat run"),
    "eval-out-dir-missing": (lambda t, r: ["eval", str(r), "--out", str(t / "no" / "e.json")],
                             "does not exist"),
    "eval-out-exists": (lambda t, r: ["eval", str(r), "--out", _raw(t, "e.json", b"{}")],
                        "already exists; pass --overwrite"),
    "eval-default-out-exists": (lambda t, r: ["eval", str(_write(r, "eval.json", "{}"))],
                                "eval.json already exists"),
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
    # more datasets: damaged or odd user files (each an error before anything is written)
    "npz-truncated": (lambda t, r: ["train", "--dataset", _cut(_npz(t))], "not a readable .npz file"),
    "npz-object-pickle": (lambda t, r: ["train", "--dataset", _npz(t, y_test=_object_array(t))],
                          "not a readable .npz file"),
    "npz-test-label-unseen": (lambda t, r: ["train", "--dataset", _npz(t, y_test=np.arange(20) % 5)],
                              "test labels 4 are outside the 4 classes"),
    "npz-single-class": (lambda t, r: ["train", "--dataset", _npz(t, y_train=np.zeros(40, np.int64))],
                         "a classifier needs at least two classes"),
    "npz-huge-label": (lambda t, r: ["train", "--dataset",
                                     _npz(t, y_train=np.r_[np.arange(39) % 4, 10**12])],
                       "labels go up to 1000000000000 but only 5 classes"),
    "npz-label-gap": (lambda t, r: ["train", "--dataset", _npz(t, y_train=np.arange(40) % 4 * 2,
                                                               y_test=np.arange(20) % 4 * 2)],
                      "none for 1, 3, 5"),
    "npz-non-square": (lambda t, r: ["train", "--dataset",
                                     _npz(t, x_train=np.zeros((40, 14, 12), np.uint8),
                                          x_test=np.zeros((20, 14, 12), np.uint8))],
                       "has 14×12 images but the models are built for square ones"),
    # round three: data that reads but is not what it claims to be
    "npz-binary-uint8": (lambda t, r: ["train", "--dataset", _npz(t, x_train=np.eye(12, dtype=np.uint8)[None]
                                                               .repeat(40, 0))], "only 0 and 1"),
    "npz-class-names-longer": (lambda t, r: ["train", "--dataset", _npz(t, classes=np.array(list("abcdef")))],
                               "'classes' names 6 classes but the labels are 0..3"),
    "npz-channels-first": (lambda t, r: ["train", "--dataset", _npz(t, x_train=np.zeros((40, 1, 12, 12),
                                                                                       np.uint8))],
                           "looks channels-first"),
    "npz-random-bytes": (lambda t, r: ["train", "--dataset",
                                       "npz:" + _raw(t, "r.npz", bytes(range(256)) * 8)],
                         "not an .npz archive"),
    "npz-uint64-huge-label": (lambda t, r: ["train", "--dataset", _npz(t, y_train=np.full(40, 2**63 + 5,
                                                                                          np.uint64))],
                              "labels up to 9223372036854775813"),
    "data-dir-missing": (lambda t, r: ["train", "--dataset", "fashion-mnist",
                                       "--data-dir", str(t / "nope")],
                         "/nope (no such directory), but this machine has it in"),
    "eval-eps-nan": (lambda t, r: ["eval", str(r), "--eps", "nan"],
                     "'eval.eps' must be a finite number, got nan"),
    "attack-eps-inf": (lambda t, r: ["train", "--set", "attack.eps=.inf"],
                       "must be a finite number, got inf"),
    "tune-space-log-no-bounds": (lambda t, r: _tune(t, "--space", "r=log:abc"), "a range is log:LOW:HIGH"),
    # the model against the data, for `dorat eval --model` as for dorat.fit (test_hostile_api.py)
    "eval-model-nan-logits": (lambda t, r: _ext(t, "external_nets:NaNLogits"), "NaN or infinite logits"),
    "eval-model-more-logits": (lambda t, r: _ext(t, "external_nets:make_wide"),
                               "must return logits of shape (N, 4)"),
    "train-model-more-logits": (lambda t, r: ["train", "--dataset", _npz(t, hw=28), "--model",
                                              "external_nets:make_wide"],
                                "must return logits of shape (N, 4)"),
    # a run that has not finished: `dorat eval` says so instead of evaluating old weights
    "eval-unfinished-run": (lambda t, r: ["eval", str(_drop(r, "model.safetensors"))],
                            "has not finished training"),
    "data-dir-without-the-data": (lambda t, r: ["train", "--dataset", "mnist", "--data-dir", str(t),
                                                "--set", "data.download=false"],
                                  "is not on this machine"),
    # more configs: sizes that only the data can check, files, seeds
    "train-subset-below-classes": (lambda t, r: ["train", "--dataset", _npz(t), "--set",
                                                 "data.train_subset=3"],
                                   "data.train_subset=3 is smaller than the 4 classes"),
    "val-size-below-classes": (lambda t, r: ["train", "--dataset", _npz(t), "--set", "data.val_size=2"],
                               "data.val_size=2 is smaller than the 4 classes"),
    "eval-n-below-classes": (lambda t, r: ["train", "--dataset", _npz(t), "--set", "eval.n=3"],
                             "eval.n=3 is smaller than the 4 classes"),
    "check-n-below-classes": (lambda t, r: ["train", "--dataset", _npz(t), "--set", "eval.check_n=2"],
                              "eval.check_n=2 is smaller than the 4 classes"),
    "eval-n-below-classes-on-eval": (lambda t, r: ["eval", str(r), "--n", "2"],
                                     "eval.n=2 is smaller than the 4 classes"),
    "yaml-duplicate-key": (lambda t, r: ["train", "--config", _yaml(t, "seed: 1\nepochs: 2\nseed: 3\n")],
                           "key 'seed' appears twice (lines 1 and 3); keep one"),
    "yaml-nested-duplicate": (lambda t, r: ["train", "--config",
                                            _yaml(t, "attack:\n  eps: 0.1\n  eps: 0.3\n")],
                              "key 'eps' appears twice"),
    "yaml-not-utf8": (lambda t, r: ["train", "--config", _raw(t, "c.yaml", b"method: \xff\xfe\n")],
                      "is not UTF-8 text"),
    "yaml-python-tag": (lambda t, r: ["train", "--config", _yaml(t, _python_tag(t))],
                        "not valid YAML"),
    "compare-python-tag": (lambda t, r: ["compare", _yaml(t, _python_tag(t)), "--out", str(t / "cmp")],
                           "not valid YAML"),
    "single-step-with-steps": (lambda t, r: ["train", "--method", "fast-at", "--set", "attack.steps=5"],
                               "fgsm-rs is a single-step attack: attack.steps=5 would not be read"),
    "keep-best-unknown": (lambda t, r: ["train", "--set", "val.keep_best=acc"], "val.keep_best"),
    "co-margin-above-1": (lambda t, r: ["train", "--set", "val.co_margin=2"], "val.co_margin"),
    "eval-which-best-missing": (lambda t, r: ["eval", str(r), "--which", "best"], "has no best.safetensors"),
    "compare-unknown-launcher": (lambda t, r: ["compare", "demo", "--out", str(t / "cmp"), "--launcher",
                                               "pbs"], "invalid choice: 'pbs'"),
    "compare-slurm-option-local": (lambda t, r: ["compare", "demo", "--out", str(t / "cmp"),
                                                 "--slurm-cpus", "4"], "--slurm-cpus is for"),
    "compare-slurm-workers": (lambda t, r: ["compare", "demo", "--out", str(t / "cmp"), "--launcher",
                                            "slurm", "--workers", "2"], "--workers is for --launcher local"),
    "compare-slurm-time-zero": (lambda t, r: ["compare", "demo", "--out", str(t / "cmp"), "--launcher",
                                              "slurm", "--slurm-time", "0"], "must be at least 1"),
    "compare-slurm-sbatch": (lambda t, r: ["compare", "demo", "--out", str(t / "cmp"), "--launcher",
                                           "slurm", "--slurm-sbatch", "account"], "must be KEY=VALUE"),
    "tune-space-malformed": (lambda t, r: _tune(t, "--space", "r"), "must be KEY=SPEC"),
    "tune-space-bad-range": (lambda t, r: _tune(t, "--space", "r=log:0:4"), "a log range needs LOW > 0"),
    "tune-space-bad-value": (lambda t, r: _tune(t, "--space", "done.beta=0.1:1.5"), "done.beta' must be in"),
    "tune-space-unknown-key": (lambda t, r: _tune(t, "--space", "done.rr=1:2"), "unknown config key"),
    "tune-objective-unknown": (lambda t, r: _tune(t, "--space", "r=1:2", objective="val.worst_class.aa"),
                               "is not a validation metric"),
    "tune-objective-test-set": (lambda t, r: _tune(t, "--space", "r=1:2", objective="test.sa"),
                                "is not a validation metric"),
    "tune-constraint-bad": (lambda t, r: _tune(t, "--space", "r=1:2", "--constraint", "val.sa ~ 3"),
                            "must be METRIC OP VALUE"),
    "tune-constraint-ref": (lambda t, r: _tune(t, "--space", "r=1:2", "--constraint",
                                               "val.sa >= nope.val.sa - 1"), "'nope' is not a method preset"),
    "tune-no-val-split": (lambda t, r: _tune(t, "--space", "r=1:2", val=False), "set data.val_size"),
    "tune-storage-unreachable": (lambda t, r: _tune(t, "--space", "r=1:2", "--storage",
                                                    f"sqlite:///{t}/no/such/dir/t.db"),
                                 "cannot open the Optuna storage"),
    "tune-storage-driver": (lambda t, r: _tune(t, "--space", "r=1:2", "--storage", "nosuchdb://h/x"),
                            "cannot open the Optuna storage"),
    "compare-duplicate-key": (lambda t, r: ["compare", _yaml(t, "methods: [at]\nmethods: [done]\n"),
                                            "--out", str(t / "cmp")], "key 'methods' appears twice"),
    "run-config-python-tag": (lambda t, r: ["eval", str(_write(r, "config.yaml", _python_tag(t)))],
                              "not valid YAML"),
    "seed-overflow": (lambda t, r: ["train", "--seed", "99999999999999999999"],
                      "'seed' must be in [0, 2^32 - 1]"),
    "seed-negative": (lambda t, r: ["train", "--seed", "-1"], "'seed' must be in [0, 2^32 - 1]"),
    "eval-seed-overflow": (lambda t, r: ["train", "--set", "eval.seed=4294967296"],
                           "'eval.seed' must be in [0, 2^32 - 1]"),
    # models and checkpoints: a code-running pickle offered to every loading path runs no code
    # (the marker file it would create is under the scratch directory, which must not change)
    "model-pickle": (lambda t, r: ["eval", str(_pickle_into(t, r, "model.safetensors"))],
                     "is not a readable safetensors file"),
    "model-torch-save": (lambda t, r: ["eval", str(_pickle_into(t, r, "model.safetensors", True))],
                         "is not a readable safetensors file"),
    "checkpoint-pickle": (lambda t, r: ["train", "--out", str(_unfinish(_pickle_into(
        t, r, "checkpoint.safetensors"))), "--resume"], "is not a readable safetensors file"),
    "checkpoint-torch-save": (lambda t, r: ["train", "--out", str(_unfinish(_pickle_into(
        t, r, "checkpoint.safetensors", True))), "--resume"], "is not a readable safetensors file"),
    "weights-pickle": (lambda t, r: ["report", str(_pickle_into(t, r, "weights.safetensors")),
                                     "--out", str(t / "rep")], "is not a readable safetensors file"),
    "model-nan-weights": (lambda t, r: ["eval", str(_nan_weights(r))], "holds NaN or infinite weights"),
    "model-empty-file": (lambda t, r: ["eval", str(_write(r, "model.safetensors", ""))],
                         "is not a readable safetensors file"),
    # dorat eval --model: a user's model (tests/external_nets.py) and weights
    "model-no-colon": (lambda t, r: _ext(t, "external_nets"), "must be MODULE:FACTORY"),
    "model-not-importable": (lambda t, r: _ext(t, "no_such_package_xyz.nets:make"), "cannot import"),
    "model-no-such-factory": (lambda t, r: _ext(t, "external_nets:nope"), "has no attribute 'nope'"),
    "model-not-callable": (lambda t, r: _ext(t, "external_nets:NOT_CALLABLE"), "is not callable"),
    "model-factory-raises": (lambda t, r: _ext(t, "external_nets:broken"), "checkpoint server"),
    "model-not-a-module": (lambda t, r: _ext(t, "external_nets:not_a_module"), "not a torch.nn.Module"),
    "model-wrong-input": (lambda t, r: _ext(t, "external_nets:make_cifar_shaped"), "does not take"),
    "model-no-dataset": (lambda t, r: ["eval", "--model", "external_nets:make_linear", "--out",
                                       str(t / "card.json")], "needs --dataset"),
    "model-unknown-dataset": (lambda t, r: _ext(t, dataset="cifar11"), "unknown dataset 'cifar11'"),
    "model-no-eps": (lambda t, r: _ext(t, eps=None), "no standard eps"),
    "model-and-run-dir": (lambda t, r: ["eval", str(r)] + _ext(t)[1:], "a RUN_DIR brings its own"),
    "model-neither": (lambda t, r: ["eval"], "name a RUN_DIR to evaluate"),
    "model-bad-normalize": (lambda t, r: _ext(t) + ["--normalize", "0.5"], "must be MEAN,STD"),
    "model-val-split": (lambda t, r: _ext(t) + ["--split", "val"], "--model evaluates on the test set"),
    "model-weights-missing": (lambda t, r: _ext(t) + ["--weights", str(t / "none.pt")], "no weights file"),
    "model-weights-shape": (lambda t, r: _ext(t) + ["--weights", _tensors(t, {"1.weight": (4, 10),
                                                                               "1.bias": (4,)})],
                            "does not fit this model"),
    "model-weights-keys": (lambda t, r: _ext(t) + ["--weights", _tensors(t, {"fc.weight": (4, 784)})],
                           "does not fit this model"),
    "model-weights-pickle": (lambda t, r: _ext(t) + ["--weights", _torch_boom(t)], "needs code to load"),
    "model-weights-whole-module": (lambda t, r: _ext(t) + ["--weights", _whole_module(t)],
                                   "needs code to load"),
    "model-weights-garbage": (lambda t, r: _ext(t) + ["--weights", _raw(t, "w.pt", b"PK\x03\x04junk")],
                              "not a readable PyTorch file"),
    "model-weights-not-a-state-dict": (lambda t, r: _ext(t) + ["--weights", _torch_obj(t, [1, 2])],
                                       "not a state dict"),
    "model-weights-nan": (lambda t, r: _ext(t) + ["--weights", _torch_obj(t, {
        "1.weight": torch.full((4, 784), float("nan")), "1.bias": torch.zeros(4)})],
                          "holds NaN or infinite weights"),
    "model-card-exists": (lambda t, r: _ext(t) + ["--out", _raw(t, "old.json", b"{}")], "already exists"),
    "report-not-a-card": (lambda t, r: ["report", _raw(t, "x.json", b'{"sa": 1}'), "--out",
                                        str(t / "rep")], "is not a dorat card"),
}


def _tune(t: Path, *extra: str, objective: str = "val.ra.pgd", val: bool = True) -> list[str]:
    return ["tune", "--dataset", f"npz:{t}/../toy.npz", "--method", "done", "--objective", objective,
            "--out", str(t / "tune"), *(["--set", "data.val_size=20"] if val else []), *extra]


def _ext(t: Path, model: str = "external_nets:make_linear", dataset: str | None = "toy",
         eps: str | None = "0.1") -> list[str]:
    """`dorat eval --model` on the matrix's toy data (28×28 grey, 4 classes), card in t."""
    ds = f"npz:{t.parent / 'toy.npz'}" if dataset == "toy" else dataset
    return (["eval", "--model", model, "--out", str(t / "card.json"), "--attacks", "pgd", "--n", "8"]
            + (["--dataset", ds] if ds else []) + (["--eps", eps] if eps else []))


def _tensors(t: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(v) for k, v in shapes.items()}, t / "w.safetensors")
    return str(t / "w.safetensors")


def _torch_obj(t: Path, obj: object) -> str:
    torch.save(obj, t / "w.pt")
    return str(t / "w.pt")


def _torch_boom(t: Path) -> str:
    _Boom.marker = _marker(t)
    return _torch_obj(t, {"1.weight": _Boom()})


def _whole_module(t: Path) -> str:
    import external_nets

    return _torch_obj(t, external_nets.make_linear())


class _Boom:
    """Unpickling this runs ``touch MARKER``."""

    marker = ""

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {_Boom.marker}",))


def _marker(t: Path) -> str:
    return str(t / "pwned")


def _pickle_into(t: Path, run: Path, name: str, torch_zip: bool = False) -> Path:
    import torch

    _Boom.marker = _marker(t)
    if torch_zip:  # the same payload as torch.save writes it (a zip holding data.pkl)
        torch.save({"w": _Boom()}, run / name)
    else:
        (run / name).write_bytes(pickle.dumps({"w": _Boom()}))
    return run


def _object_array(t: Path) -> np.ndarray:
    _Boom.marker = _marker(t)
    a = np.empty(20, dtype=object)
    a[:] = [_Boom()] * 20
    return a


def _python_tag(t: Path) -> str:
    return f"epochs: !!python/object/apply:os.system ['touch {_marker(t)}']\n"


def _nan_weights(run: Path) -> Path:
    from safetensors.torch import load_file, save_file

    sd = load_file(run / "model.safetensors")
    save_file({k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in sd.items()},
              run / "model.safetensors")
    return run


def _drop(run: Path, name: str) -> Path:
    (run / name).unlink()
    return run


def _write(run: Path, name: str, text: str) -> Path:
    (run / name).write_text(text)
    return run


def _raw(t: Path, name: str, data: bytes) -> str:
    (t / name).write_bytes(data)
    return str(t / name)


def _cut(dataset: str) -> str:
    p = Path(dataset[4:])
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return dataset


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
    code, out, err = run_cli(capsys, *argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (argv, err)
    assert len(lines) == 1 and lines[0].startswith("dorat: error: "), (argv, err)
    assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before, "the failed command wrote or changed files"
    assert not (tmp_path / "out").exists()


def test_matrix_is_big_enough() -> None:
    assert len(MATRIX) >= 120


