"""FAAL's class weights: the KL(u ‖ p) ≤ r problem of the official code, solved by hand for two
classes, against cvxpy for ten, in a training run (log.jsonl's class weights) and its preset's
fine-tuning rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dorat import config as C
from dorat.errors import ConfigError
from dorat.objectives.faal import class_margins, kl_ball_weights, probability_margin
from dorat.runs.run import train


def test_two_classes_by_hand() -> None:
    # u = (1/2, 1/2), p = (q, 1 − q): KL(u ‖ p) = −½·log(4q(1 − q)) = r, and the class with the
    # larger margin takes q > 1/2. r = ½·log(4/3) gives q(1 − q) = 3/16: q = 3/4.
    p = kl_ball_weights(torch.tensor([0.3, -0.1]), 0.5 * math.log(4 / 3))
    assert p.tolist() == pytest.approx([0.75, 0.25], abs=1e-9)
    p = kl_ball_weights(torch.tensor([-0.2, 0.4]), 0.5 * math.log(4 / 3))  # the order follows m
    assert p.tolist() == pytest.approx([0.25, 0.75], abs=1e-9)
    assert kl_ball_weights(torch.tensor([0.3, -0.1]), 0.0).tolist() == [0.5, 0.5]  # r = 0: uniform
    assert kl_ball_weights(torch.tensor([0.2, 0.2, 0.2]), 1.0).tolist() == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("r", [0.05, 0.5, 2.0])
def test_ten_classes_agree_with_cvxpy(r: float) -> None:
    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(int(r * 100))
    m = rng.uniform(-1, 1, 10)
    p = cp.Variable(10, nonneg=True)
    u = np.full(10, 0.1)
    # the official FAAL.py's problem: max p·m, Σp = 1, Σ kl_div(Pemp, p) ≤ r
    cp.Problem(cp.Maximize(p @ m), [cp.sum(p) == 1, cp.sum(cp.kl_div(u, p)) <= r]).solve()
    ours = kl_ball_weights(torch.tensor(m), r).numpy()
    assert np.abs(ours - p.value).max() < 1e-4
    assert ours.sum() == pytest.approx(1.0, abs=1e-12)
    kl = float(np.sum(u * np.log(u / ours)))
    assert kl <= r + 1e-9 and kl == pytest.approx(r, rel=1e-6)  # on the ball's edge, inside it


def test_the_margin_and_the_class_means_follow_the_official_definition() -> None:
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    y = torch.tensor([0, 0, 2])
    s = torch.softmax(logits, 1)
    expect = [s[0, 1:].max() - s[0, 0], s[1, 1:].max() - s[1, 0], s[2, :2].max() - s[2, 2]]
    m = probability_margin(logits, y)
    assert m.tolist() == pytest.approx([float(v) for v in expect])
    per_class = class_margins(m, y, 3)
    assert per_class.tolist() == pytest.approx([float((m[0] + m[1]) / 2), -1.0, float(m[2])])


def test_faal_trains_logs_class_weights_and_the_preset_needs_init(tmp_path: Path) -> None:
    from conftest import make_synthetic_npz

    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=256, n_test=40)
    sets = ["attack.steps=2", "eval.n=20", "eval.checks=false", "eval.steps=2", "faal.r=1.0"]
    with pytest.raises(ConfigError, match="faal fine-tunes a trained model.*--init RUN"):
        C.resolve(None, {"dataset": f"npz:{npz}", "method": "faal"}, sets)
    cfg = C.resolve(None, {"dataset": f"npz:{npz}", "method": "faal-scratch", "epochs": 2,
                           "batch_size": 64}, sets)
    train(cfg, tmp_path / "scratch", log=lambda s: None)
    log = [json.loads(line) for line in (tmp_path / "scratch" / "log.jsonl").read_text().splitlines()]
    for rec in log:
        w = rec["class_w"]
        assert len(w) == 4 and sum(w) == pytest.approx(1.0, abs=1e-4) and rec["reweighting"]
    assert max(log[-1]["class_w"]) > 0.26  # r = 1 tilts the weights off uniform (0.25)
    # the paper's use: fine-tune the trained model for 2 epochs at lr 0.01, lr/10 at half
    cfg = C.resolve(None, {"dataset": f"npz:{npz}", "method": "faal", "epochs": 2, "batch_size": 64,
                           "init": str(tmp_path / "scratch")},
                    [*sets, "optim.lr=0.01", "optim.milestones=[0.5]"])
    train(cfg, tmp_path / "ft", log=lambda s: None)
    rec = json.loads((tmp_path / "ft" / "init.json").read_text())
    assert rec["file"] == str((tmp_path / "scratch" / "model.safetensors").resolve())
