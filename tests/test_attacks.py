"""PGD stays in the threat set, reaches the closed-form optimum on a linear model, and leaves
the model's mode and requires_grad flags as they were."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dorat.attacks import PGDSpec, attack_loss, fgsm, pgd
from dorat.models import build_model


def _model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small-cnn", 1, 28, 10)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_stays_in_ball_and_box(norm: str) -> None:
    model = _model()
    x = torch.rand(16, 1, 28, 28)
    x[:4] = 0.0
    x[4:8] = 1.0  # examples on the box boundary
    y = torch.randint(0, 10, (16,))
    eps = 0.3 if norm == "linf" else 2.0
    g = torch.Generator().manual_seed(0)
    r = pgd(model, x, y, PGDSpec(eps, eps / 4, 7, norm=norm), generator=g)
    d = r.x_adv - x
    if norm == "linf":
        assert d.abs().max() <= eps + 1e-6
    else:
        assert d.flatten(1).norm(dim=1).max() <= eps + 1e-5
    assert r.x_adv.min() >= 0 and r.x_adv.max() <= 1
    assert d.abs().sum() > 0


def test_pgd_on_linear_model_reaches_closed_form_worst_case() -> None:
    """Two-class linear model, label 0: CE = softplus(-(w·x + b)); the l-inf worst case inside
    the ball (box inactive) is softplus(-(w·x + b) + eps·||w||_1)."""
    torch.manual_seed(1)
    d = 50
    lin = nn.Linear(d, 2)
    x = 0.3 + 0.4 * torch.rand(8, d)  # in [0.3, 0.7]: eps = 0.1 never touches the box
    y = torch.zeros(8, dtype=torch.long)
    eps = 0.1
    w = lin.weight[0] - lin.weight[1]
    b = lin.bias[0] - lin.bias[1]
    expected = nn.functional.softplus(-(x @ w + b) + eps * w.abs().sum())
    r = pgd(lin, x, y, PGDSpec(eps, eps / 4, 10), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(r.loss, expected.detach(), rtol=1e-5, atol=1e-6)
    # the optimum is the corner x - eps·sign(w)
    assert torch.allclose(r.x_adv, x - eps * w.sign().detach(), atol=1e-6)


def test_attack_restores_mode_and_grad_flags_even_on_error() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    model.train()
    model[1].bias.requires_grad_(False)
    x, y = torch.rand(5, 4), torch.randint(0, 3, (5,))
    stats = model[2].running_mean.clone()
    pgd(model, x, y, PGDSpec(0.1, 0.05, 3, train_mode=False))
    assert model.training and torch.equal(stats, model[2].running_mean)
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad
    with pytest.raises(ValueError):
        pgd(model, x, y, PGDSpec(0.1, 0.05, 3, loss="nope"))
    assert model.training and model[1].weight.requires_grad


def test_params_do_not_require_grad_during_attack() -> None:
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(self.lin.weight.requires_grad)
            return self.lin(x)

    m = Probe()
    pgd(m, torch.rand(2, 4), torch.tensor([0, 1]), PGDSpec(0.1, 0.05, 2))
    assert seen and not any(seen) and m.lin.weight.requires_grad
    assert m.lin.weight.grad is None


def test_first_wrong_kappa_and_early_stop() -> None:
    # A model that is correct iff the input sum is at most 6: PGD crosses it at a known step.
    class Thresh(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x.flatten(1).sum(1)
            return torch.stack([6 - s, s - 6], 1)

    x = torch.full((1, 10), 0.3)  # sum 3; each linf step of 0.1 adds 1.0 to the sum
    y = torch.tensor([0])
    r = pgd(Thresh(), x, y, PGDSpec(eps=0.5, alpha=0.1, steps=8, random_start=False))
    # iterate t has sum 3 + t (capped at 8 by eps): a tie at t = 3 is still correct, wrong from t = 4
    assert r.first_wrong.item() == 4 and r.kappa.item() == 4 and not r.correct.item()
    assert r.x_adv.sum().item() == pytest.approx(8.0)
    stopped = pgd(Thresh(), x, y, PGDSpec(eps=0.5, alpha=0.1, steps=8, random_start=False, early_stop_tau=0))
    assert stopped.x_adv.sum().item() == pytest.approx(7.0)  # frozen at the first wrong iterate
    tau2 = pgd(Thresh(), x, y, PGDSpec(eps=0.5, alpha=0.1, steps=8, random_start=False,
                                   early_stop_tau=1))
    assert tau2.x_adv.sum().item() == pytest.approx(8.0)


def test_fgsm_and_margin_loss() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    assert torch.allclose(attack_loss(logits, y, "margin"), torch.tensor([-1.0, 2.0]))
    model = _model()
    x = torch.rand(4, 1, 28, 28)
    r = fgsm(model, x, torch.zeros(4, dtype=torch.long), 0.1, generator=torch.Generator().manual_seed(1))
    assert (r.x_adv - x).abs().max() <= 0.1 + 1e-6


@pytest.mark.parametrize("tau", [0, 1, 3])
def test_early_stop_compaction_gives_the_uncompacted_result(tau: int) -> None:
    """FAT's early-stopped PGD leaves stopped examples out of the later passes: x_adv, the first
    wrong iterate and κ are those of the loop over the whole batch, bit for bit."""
    from dorat.attacks.pgd import PGDSpec, pgd
    from dorat.models import build_model

    torch.manual_seed(0)
    m = build_model("small-cnn", 1, 28, 10).eval()
    x, y = torch.rand(96, 1, 28, 28), torch.randint(0, 10, (96,))
    with torch.no_grad():  # half the batch starts correct: they stop at different steps
        y[:48] = m(x[:48]).argmax(1)
    out = []
    for compact in (False, True):
        spec = PGDSpec(0.03, 0.003, 8, "linf", "ce", True, False, early_stop_tau=tau, compact=compact)
        out.append(pgd(m, x, y, spec, generator=torch.Generator().manual_seed(1)))
    a, b = out
    assert len(set(a.first_wrong.tolist())) > 2  # examples stopped at several different steps
    assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.first_wrong, b.first_wrong)
    assert torch.equal(a.kappa, b.kappa) and torch.equal(a.loss, b.loss)
