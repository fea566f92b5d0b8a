"""Baselines (METHODS.md §2) as parts: weightings and losses against hand computations, burn-in
timing, and every preset end to end through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dorat import config as C
from dorat.attacks import AttackResult
from dorat.cli import main
from dorat.errors import ConfigError
from dorat.objectives.attacks import FATAttack, FGSMRSAttack, NFGSMAttack, PGDKLAttack
from dorat.objectives.base import LossOutput, StepContext
from dorat.objectives.losses import MARTLoss, TRADESLoss
from dorat.objectives.weightings import GAIRATWeighting, MAILWeighting, WMMRWeighting

LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]])
Y = torch.tensor([0, 0, 1])


def _ctx(epoch: int = 10, epochs: int = 10) -> StepContext:
    return StepContext(epoch, epochs, 0)


def _out() -> LossOutput:
    return LossOutput(torch.ones(3), LOGITS)


def _pm_by_hand() -> list[float]:
    out = []
    for z, y in zip(LOGITS.tolist(), Y.tolist()):
        e = [math.exp(v) for v in z]
        p = [v / sum(e) for v in e]
        out.append(p[y] - max(p[k] for k in range(3) if k != y))
    return out


def test_gairat_weights_by_hand() -> None:
    kappa = torch.tensor([0, 5, 10])
    info = AttackResult(LOGITS, torch.zeros(3, dtype=torch.long), kappa)
    wt = GAIRATWeighting(lam=-1.0)
    wt.steps = 10  # K, the training attack's steps (bind reads attack.steps)
    w = wt.weights(_out(), Y, info, _ctx())
    raw = [(math.tanh(-1.0 + 5 * (1 - 2 * k / 10)) + 1) / 2 for k in (0, 5, 10)]
    expect = [r / sum(raw) for r in raw]  # mean 1 in the batch, then 1/|B| units
    assert w.tolist() == pytest.approx(expect, rel=1e-6, abs=1e-8)  # float32 tanh near −1
    assert w[0] > w[1] > w[2]  # examples broken early weigh most


def test_mail_weights_by_hand() -> None:
    w = MAILWeighting(bias=-1.5, slope=1.0).weights(_out(), Y, None, _ctx())
    expect = [3 / (1 + math.exp(-(-1.5 - pm))) / 3 for pm in _pm_by_hand()]
    assert w.tolist() == pytest.approx(expect, rel=1e-6)


def test_wmmr_weights_by_hand() -> None:
    w = WMMRWeighting(alpha=0.5).weights(_out(), Y, None, _ctx())
    expect = [math.exp(-0.5 * pm) / 3 for pm in _pm_by_hand()]
    assert w.tolist() == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("weighting,switch", [
    (GAIRATWeighting(warmup="50%"), 5), (MAILWeighting(warmup=0.625), 6),
    (WMMRWeighting(warmup="30%"), 3), (WMMRWeighting(warmup=4), 4)])
def test_burn_in_switches_at_documented_epoch(weighting, switch: int) -> None:  # noqa: ANN001
    info = AttackResult(LOGITS, torch.zeros(3, dtype=torch.long), torch.tensor([0, 5, 10]))
    for epoch in range(10):
        w = weighting.weights(_out(), Y, info, _ctx(epoch, 10))
        uniform = torch.allclose(w, torch.full((3,), 1 / 3))
        assert uniform == (epoch < switch), epoch


class _Lin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l(x)


def test_trades_loss_direct_formula() -> None:
    m = _Lin()
    x, xa, y = torch.rand(5, 4), torch.rand(5, 4), torch.randint(0, 3, (5,))
    out = TRADESLoss(beta=6.0)(m, x, xa, y, _ctx())
    p, q = F.softmax(m(x), 1), F.softmax(m(xa), 1)
    kl = (p * (p.log() - q.log())).sum(1)
    assert torch.allclose(out.loss, 6.0 * kl, atol=1e-6)
    assert torch.allclose(out.base, F.cross_entropy(m(x), y, reduction="none"), atol=1e-6)


def test_mart_loss_direct_formula() -> None:
    m = _Lin()
    x, xa, y = torch.rand(5, 4), torch.rand(5, 4), torch.randint(0, 3, (5,))
    out = MARTLoss(beta=6.0)(m, x, xa, y, _ctx())
    p, q = F.softmax(m(x), 1), F.softmax(m(xa), 1)
    expect = []
    for i in range(5):
        other = max(q[i, k] for k in range(3) if k != y[i])
        bce = -torch.log(q[i, y[i]]) - torch.log(1.0001 - other)
        kl = (p[i] * (p[i].log() - torch.log(q[i] + 1e-12))).sum()
        expect.append(float((bce + 6.0 * kl * (1.0000001 - p[i, y[i]])).detach()))
    assert out.loss.tolist() == pytest.approx(expect, rel=1e-5)


def test_fat_dynamic_tau_and_kl_attack() -> None:
    a = FATAttack(eps=0.1, alpha=0.02, steps=5, tau=0, dynamic_tau=True)
    assert [a.tau_at(_ctx(e, 120)) for e in (0, 49, 50, 89, 90, 119)] == [0, 0, 1, 1, 2, 2]
    m = _Lin()
    x, y = torch.rand(6, 4) * 0.5 + 0.25, torch.randint(0, 3, (6,))
    kl_attack = PGDKLAttack(eps=0.1, alpha=0.03, steps=5)
    r = kl_attack(m, x, y, StepContext(0, 1, 0, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        p, q = F.softmax(m(x), 1), F.softmax(m(r.x_adv), 1)
    assert (p * (p.log() - q.log())).sum(1).min() > 0 and (r.x_adv - x).abs().max() <= 0.1 + 1e-6


PRESETS = ["trades", "mart", "fat", "gairat", "mail-at", "mail-trades", "wmmr", "done-trades", "fast-at",
           "done-n-fgsm"]


@pytest.mark.parametrize("method", PRESETS)
def test_every_preset_trains_through_the_cli(method: str, tmp_path: Path, synthetic_npz: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / method
    steps = 1 if method in ("fast-at", "done-n-fgsm") else 2  # single-step attacks take 1
    code = main(["train", "--method", method, "--dataset", f"npz:{synthetic_npz}", "--epochs", "2",
                 "--out", str(out), "--set", f"attack.steps={steps}",
                 "--set", "eval.n=40",
                 "--set", "attack.eps=0.3", "--set", "attack.alpha=0.15",
                 "--set", "eval.steps=2", "--set", "gairat.warmup=50%", "--set", "mail.warmup=0.5"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert 0 <= m["ra"]["pgd"] <= m["sa"] <= 1 and m["method"] == method
    log = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    if method in ("gairat", "mail-at", "mail-trades"):
        assert log[0]["ess"] == pytest.approx(1.0) and log[1]["ess"] < 1.0  # burn-in, then weights


def _first_step(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    xd = (x + start).requires_grad_()
    return torch.autograd.grad(F.cross_entropy(m(xd), y, reduction="sum"), xd)[0].sign()


def test_single_step_attacks_are_noise_plus_one_signed_step() -> None:
    """FGSM-RS: uniform start in the ε-ball, a step of 1.25ε, clipped to the ball. N-FGSM:
    uniform noise in 2ε, a step of ε, not clipped (only the pixel box)."""
    m = _Lin()
    x, y = torch.rand(64, 4) * 0.5 + 0.25, torch.randint(0, 3, (64,))
    eps = 0.05
    for attack, noise, step, clip in ((FGSMRSAttack(eps=eps), 1.0, 1.25, True),
                                      (NFGSMAttack(eps=eps), 2.0, 1.0, False)):
        r = attack(m, x, y, StepContext(0, 1, 0, torch.Generator().manual_seed(3)))
        u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3))
        start = (2 * u - 1) * noise * eps
        expect = start + step * eps * _first_step(m, x, y, start)
        if clip:
            expect = expect.clamp(-eps, eps)
        assert torch.allclose(r.x_adv - x, expect, atol=1e-6), type(attack).__name__
    assert (r.x_adv - x).abs().max() > 1.5 * eps  # N-FGSM leaves the ε-ball
    with pytest.raises(ConfigError, match="single-step attack: attack.steps=5"):
        C.resolve(None, {"method": "n-fgsm"}, ["attack.steps=5"])
