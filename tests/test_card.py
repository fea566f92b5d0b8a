"""`dorat eval --model` and `dorat.benchmark`: any nn.Module, weights from safetensors or a
torch.save'd state dict (weights_only), the card, and `dorat report` reading cards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import dorat
import external_nets
from conftest import make_synthetic_npz, run_cli
from dorat.errors import ConfigError
from dorat.evaluation.card import Normalized, parse_normalize, read_torch_state

EVAL = ["--attacks", "pgd,cw", "--eps", "0.1", "--steps", "5", "--n", "40", "--no-checks"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_npz(tmp_path_factory.mktemp("card") / "toy.npz", n_train=256, n_test=80)


def _fit(model: torch.nn.Module, npz: Path, normalise: bool = False) -> torch.nn.Module:
    """A few steps of plain training, so that accuracies are not trivial."""
    d = np.load(npz)
    x = torch.tensor(d["x_train"]).float()[:, None] / 255
    x = (x - external_nets.MEAN) / external_nets.STD if normalise else x
    y = torch.tensor(d["y_train"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_card_from_safetensors_and_from_a_state_dict_agree(toy: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    model = _fit(external_nets.make_linear(), toy)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    # a training checkpoint as people save them: nested, with DataParallel's "module." prefix
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pt")
    cards = []
    for name in ("w.safetensors", "w.pt"):
        out = tmp_path / f"{name}.card.json"
        code, stdout, err = run_cli(capsys, "eval", "--model", "external_nets:make_linear",
                                    "--weights", str(tmp_path / name), "--dataset", f"npz:{toy}",
                                    "--out", str(out), *EVAL)
        assert code == 0, err
        assert "worst class" in stdout and f"card in {out}" in stdout
        cards.append(json.loads(out.read_text()))
    a, b = cards
    for k in ("sa", "ra", "per_class", "worst_class", "tail30", "n"):
        assert a[k] == b[k], k
    assert a["format"] == "dorat-card/1" and a["dataset"] == f"npz:{toy}"
    assert a["threat_model"] == "Linf" and a["eps"] == 0.1 and a["n"] == 40
    assert a["clean_acc"] == round(100 * a["sa"], 2) and "autoattack_acc" not in a
    assert set(a["robust_acc"]) == {"pgd", "cw", "worst"}
    assert len(a["per_class"]["worst"]) == 4 and a["worst_class_acc"]["worst"] == \
        round(100 * min(a["per_class"]["worst"]), 2)
    assert a["model"]["factory"] == "external_nets:make_linear"
    assert a["model"]["weights_sha256"] == hashlib.sha256((tmp_path / "w.safetensors").read_bytes()
                                                          ).hexdigest()
    assert a["model"]["parameters"] == 28 * 28 * 4 + 4
    assert a["versions"]["dorat"] == dorat.__version__ and "torch" in a["versions"]
    assert 0 < a["sa"] and a["ra"]["worst"] <= a["sa"]
    # the same numbers as the evaluator called on the model directly
    d = np.load(toy)
    x, y = torch.tensor(d["x_test"])[:, None], torch.tensor(d["y_test"])
    from dorat.evaluation.evaluate import (
        EvalSettings,  # binds dorat.evaluation.evaluate to the module: still callable
    )

    m, _ = dorat.evaluate(model, x, y, [str(i) for i in range(4)], ["pgd", "cw"],
                          EvalSettings(eps=0.1, steps=5), n=40)
    assert m["sa"] == a["sa"] and m["ra"] == a["ra"]


def test_benchmark_with_normalize_equals_a_self_normalising_model(toy: Path) -> None:
    inner = _fit(external_nets.make_linear(), toy, normalise=True)
    own = external_nets.SelfNormalizing()
    own.net.load_state_dict(inner.state_dict())
    kw = dict(eps=0.1, n=40, attacks=["pgd"], steps=5, checks=False)
    wrapped = dorat.benchmark(inner, f"npz:{toy}", normalize=(external_nets.MEAN, external_nets.STD), **kw)
    direct = dorat.benchmark(own.eval(), f"npz:{toy}", **kw)
    assert wrapped["ra"] == direct["ra"] and wrapped["sa"] == direct["sa"]
    assert wrapped["model"]["normalize"] == {"mean": [0.3], "std": [0.2]}
    assert direct["model"]["normalize"] is None


def test_normalize_parsing_and_wrapper() -> None:
    assert parse_normalize("0.5,0.25", 3) == ([0.5] * 3, [0.25] * 3)
    assert parse_normalize("0.1,0.2,0.3,1,2,3", 3) == ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    for bad in ("0.5", "a,b", "0.1,0.2,0.3,1", "0.5,0", "nan,1"):
        with pytest.raises(ConfigError):
            parse_normalize(bad, 3)
    m = Normalized(torch.nn.Identity(), [0.5, 0.0, 1.0], [0.5, 1.0, 2.0])
    x = torch.ones(1, 3, 2, 2)
    assert m(x)[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0]


def test_read_torch_state_accepts_state_dicts_and_refuses_code(tmp_path: Path) -> None:
    sd = {"a.weight": torch.ones(2, 2)}
    for obj in (sd, {"model": sd}, {"model_state_dict": sd, "optimizer": {"lr": 0.1}}):
        torch.save(obj, tmp_path / "x.pt")
        assert list(read_torch_state(tmp_path / "x.pt")) == ["a.weight"]
    torch.save(torch.nn.Linear(2, 2), tmp_path / "whole.pt")  # a pickled module needs its class
    with pytest.raises(dorat.CheckpointError, match="needs code to load"):
        read_torch_state(tmp_path / "whole.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(dorat.CheckpointError, match="not a state dict"):
        read_torch_state(tmp_path / "list.pt")


def test_report_reads_cards_beside_runs(toy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--dataset", f"npz:{toy}", "--epochs", "1", "--out", str(run),
                           "--set", "attack.steps=1", "--set", "eval.n=40", "--set", "eval.checks=false",
                           "--set", "eval.attacks=[pgd,cw]")
    assert code == 0, err
    card = tmp_path / "mine.json"
    code, _, err = run_cli(capsys, "eval", "--model", "external_nets:make_linear", "--dataset",
                           f"npz:{toy}", "--out", str(card), *EVAL)
    assert code == 0, err
    code, out, err = run_cli(capsys, "report", str(run), str(card), "--out", str(tmp_path / "rep"))
    assert code == 0, err
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "| mine | external |" in text and "| run | at |" in text
    assert "card: npz:" in text and (tmp_path / "rep" / "per_class.png").is_file()
