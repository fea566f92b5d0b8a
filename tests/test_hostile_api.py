"""The Python API under hostile input, as tests/test_hostile.py does the CLI: each bad input to
`dorat.fit`, `dorat.evaluation.evaluate` or `dorat.benchmark` is one DoratError naming the problem (no
torch or numpy traceback), and nothing is written before the inputs and one forward pass of the
model are checked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn as nn

import dorat
from conftest import make_synthetic_npz

CLASSES = [str(i) for i in range(4)]
FAST = {"epochs": 1, "batch_size": 32, "log": lambda s: None,
        "set": {"attack.steps": 1, "eval.steps": 1, "eval.checks": False, "eval.n": 8}}


def net(c: int = 1, k: int = 4, size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * size * size, k))


class NaNNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 4), float("nan"))


def data(n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 4


def fit(*args: Any, **kw: Any) -> Callable[[Path], Any]:
    return lambda out: dorat.fit(*args, out=out / "run", **{**FAST, **kw})


def evaluate(model: nn.Module, x: Any, y: Any, classes: list[str] = CLASSES) -> Callable[[Path], Any]:
    return lambda out: dorat.evaluate(model, x, y, classes, ["pgd"])


def _loader(n: int) -> torch.utils.data.DataLoader:
    x, y = data(80)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:n], y[:n]), batch_size=16)


X, Y = data()
API: dict[str, tuple[Callable[[Path], Any], str]] = {
    # the model against the data: one forward pass before anything is written
    "fit-more-logits-than-classes": (fit(net(k=20), (X, Y)), "must return logits of shape (N, 4)"),
    "fit-fewer-logits-than-classes": (fit(net(k=3), (X, Y)), "must return logits of shape (N, 4)"),
    "fit-3-channels-into-1": (fit(net(c=1), (X.repeat(1, 3, 1, 1), Y)), "does not take"),
    "fit-model-for-another-size": (fit(net(size=6), (X, Y)), "does not take"),
    "fit-nan-logits": (fit(NaNNet(), (X, Y)), "NaN or infinite logits"),
    # the data
    "fit-channels-last": (fit(net(), (X.permute(0, 2, 3, 1), Y)), "look channels-last"),
    "fit-2d-images": (fit(net(), (X[:, 0, 0], Y)), "must be N×C×H×W"),
    "fit-label-count": (fit(net(), (X, Y[:-1])), "one label each"),
    "fit-empty-tensors": (fit(net(), (X[:0], Y[:0])), "holds no examples"),
    "fit-empty-loader": (fit(net(), _loader(0)), "gave no batches"),
    "fit-empty-dataset": (fit(net(), torch.utils.data.TensorDataset(X[:0], Y[:0])), "holds no examples"),
    "fit-nan-pixels": (fit(net(), (X.masked_fill(X > 0.9, float("nan")), Y)), "NaN or infinite pixels"),
    "fit-inf-pixels": (fit(net(), (X.masked_fill(X > 0.9, float("inf")), Y)), "NaN or infinite pixels"),
    "fit-0-255-floats": (fit(net(), (X * 255, Y)), "outside [0, 1]"),
    "fit-float-labels": (fit(net(), (X, Y.float())), "labels must be integers"),
    "fit-negative-labels": (fit(net(), (X, Y - 1)), "labels must be integers 0..C-1"),
    "fit-int64-pixels": (fit(net(), ((X * 255).long(), Y)), "dtype torch.int64"),
    "fit-a-class-missing-in-training": (fit(net(), (X, Y.masked_fill(Y == 2, 3))), "only 3 classes"),
    "fit-test-class-not-in-training": (fit(net(k=6), (X, Y), (X[:8], torch.full((8,), 5))),
                                       "test labels 5 are outside the 4 classes"),
    "fit-test-images-of-another-size": (fit(net(), (X, Y), (X[:8, :, :6, :6], Y[:8])), "differ from"),
    "fit-one-class": (fit(net(), (X, Y * 0)), "at least two classes"),
    "fit-a-class-of-one-example": (fit(net(), (X[:5], Y[:5])), "fewer than 2 examples"),
    "fit-not-data": (fit(net(), "x.npz"), "give (x, y) tensors"),
    "fit-class-names-short": (fit(net(), (X, Y), classes=["a", "b", "c"]), "classes names 3 classes"),
    # the config
    "fit-key-given-twice": (fit(net(), (X, Y), set={**FAST["set"], "epochs": 2}),
                            "epochs is given twice"),
    "fit-method-as-a-key": (fit(net(), (X, Y), set={"method": "done"}), "give the method as"),
    "fit-unknown-key": (fit(net(), (X, Y), attack__epss=0.1), "unknown config key"),
    "fit-unknown-method": (fit(net(), (X, Y), method="dnoe"), "dnoe"),
    "fit-eval-n-too-small": (fit(net(), (X, Y), set={"eval.n": 2}), "eval.n"),
    # dorat.evaluation.evaluate takes what fit takes, and refuses what fit refuses
    "evaluate-more-logits": (evaluate(net(k=20), X, Y), "must return logits of shape (N, 4)"),
    "evaluate-nan-logits": (evaluate(NaNNet(), X, Y), "NaN or infinite logits"),
    "evaluate-channels-last": (evaluate(net(), X.permute(0, 2, 3, 1), Y), "look channels-last"),
    "evaluate-nan-pixels": (evaluate(net(), X.masked_fill(X > 0.9, float("nan")), Y), "NaN"),
    "evaluate-labels-past-the-names": (evaluate(net(), X, Y, CLASSES[:3]), "3 classes are named"),
    "evaluate-empty": (evaluate(net(), X[:0], Y[:0]), "holds no examples"),
    "evaluate-3-channels-into-1": (evaluate(net(), X.repeat(1, 3, 1, 1), Y), "does not take"),
}


@pytest.mark.parametrize("case", list(API))
def test_bad_api_input(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    call, needle = API[case]
    with pytest.raises(dorat.DoratError) as e:
        call(tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert list(tmp_path.iterdir()) == [], "the failed call wrote files"


def test_benchmark_refuses_nan_logits_instead_of_a_10_percent_card(tmp_path: Path) -> None:
    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=64, n_test=40)
    with pytest.raises(dorat.ConfigError, match="NaN or infinite logits"):
        dorat.benchmark(NaNNet(), f"npz:{npz}", eps=0.1, n=8, attacks=["pgd"], checks=False)


def test_evaluate_takes_the_layouts_fit_takes() -> None:
    """N×H×W images and numpy arrays, as fit takes them: the same numbers as N×1×H×W tensors."""
    model = net()
    a, _ = dorat.evaluate(model, X, Y, CLASSES, ["pgd"])
    b, _ = dorat.evaluate(model, X[:, 0].numpy(), Y.numpy(), CLASSES, ["pgd"])
    assert a["sa"] == b["sa"] and a["ra"] == b["ra"]


def test_a_model_class_from_the_script_is_named_at_fit_time(tmp_path: Path) -> None:
    """A class defined in __main__ (the user's script) is recorded, but no other process can
    rebuild it: fit says so, and how to make the run reopenable."""

    class Local(nn.Module):  # defined inside a function: <locals> in its qualified name
        def __init__(self) -> None:
            super().__init__()
            self.net = net()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    lines: list[str] = []
    fitted = dorat.fit(Local(), data(), out=tmp_path / "run", classes=list("abcd"),
                       **{**FAST, "log": lines.append})
    assert fitted.metrics["classes"] == list("abcd")  # the names reach the metrics
    assert any(s.startswith("warning: the model class") and "load_run(RUN, model=...)" in s
               for s in lines), lines


def test_a_model_from_a_module_in_the_working_directory_reopens_there(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """`dorat eval RUN` from the directory that holds mynet.py rebuilds the model dorat.fit was
    given (as `--model mynet:make` works there)."""
    import sys

    from conftest import run_cli

    (tmp_path / "mynet_fit.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(64, 4))\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import mynet_fit

    dorat.fit(mynet_fit.Net(), data(), out=tmp_path / "run", **FAST)
    monkeypatch.delitem(sys.modules, "mynet_fit")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in (str(tmp_path), "")])
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "run"), "--attacks", "pgd", "--n", "8",
                             "--steps", "1")
    assert code == 0, err


def test_small_and_suspicious_npz_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """0/1 uint8 pixels and class names that do not match the labels are errors; a class of
    three training images trains with a warning."""
    from conftest import run_cli

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 16, 16), dtype=np.uint8)
    y = np.arange(40) % 4
    cases = {"binary": dict(x_train=(x > 127).astype(np.uint8)),
             "names": dict(classes=np.array(list("abcdef")))}
    for name, change in cases.items():
        arrays = {"x_train": x, "y_train": y, "x_test": x[:12], "y_test": y[:12], **change}
        np.savez(tmp_path / f"{name}.npz", **arrays)
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{tmp_path}/binary.npz", "--out",
                           str(tmp_path / "o1"))
    assert code == 2 and "only 0 and 1" in err
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{tmp_path}/names.npz", "--out",
                           str(tmp_path / "o2"))
    assert code == 2 and "'classes' names 6 classes but the labels are 0..3" in err
    few = np.where(np.arange(40) < 28, y, y % 3)  # class 3: 7 training examples
    np.savez(tmp_path / "few.npz", x_train=x, y_train=few,
             x_test=x[:12], y_test=y[:12])
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{tmp_path}/few.npz", "--out",
                           str(tmp_path / "o3"), "--epochs", "1", "--set", "attack.steps=1",
                           "--set", "eval.n=8", "--set", "eval.checks=false", "--set", "eval.steps=1")
    assert code == 0, err
    assert "warning: class '3' has 7 training examples (40 in all)" in err
