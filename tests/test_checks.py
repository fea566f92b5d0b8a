"""AutoAttack through the adapter, and each evaluation sanity check firing on a model built to
fail it (and staying quiet on a sound one)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn

import dorat.attacks.autoattack as aa_mod
from dorat.attacks.autoattack import autoattack_correct
from dorat.evaluation.checks import failed
from dorat.evaluation.evaluate import EvalSettings, evaluate

C = 10
CLASSES = [f"c{i}" for i in range(C)]
FAST_AA = {"iters": 10, "queries": 200, "targets": 2}


def grey_levels(n_per: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class c = an 8×8 image of grey level (c + 0.5)/10 plus ±0.02 noise (uint8)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(n_per)
    v = (y.float() + 0.5) / C
    x = v[:, None, None, None] + (torch.rand(len(y), 1, 8, 8, generator=g) - 0.5) * 0.04
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), y


def _mean_logits(m: torch.Tensor) -> torch.Tensor:
    centers = (torch.arange(C, device=m.device) + 0.5) / C
    return -5000.0 * (m[:, None] - centers) ** 2


class MeanReader(nn.Module):
    """Sound (differentiable) model: the class is the nearest grey level of the mean pixel.
    Every image is one mean-shift of 0.05 from the next class, so at ε = 0.1 nothing is robust."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * _mean_logits(x.mean((1, 2, 3)))


class QuantisedMeanReader(MeanReader):
    """The same model behind a non-differentiable input quantiser: gradients are exactly zero,
    so PGD stalls, while AutoAttack's black-box Square still finds the mean shift."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.round(x * 16) / 16)


class Noisy(MeanReader):
    """Stochastic predictions (a random defence): eps_zero must fire."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 30 * torch.randn(len(x), C, device=x.device)


class RightOnlyWhenPerturbed(nn.Module):
    """Correct only when the pixels spread (std > 0.05), i.e. under a large perturbation, and
    without gradients (a quantised mean): robust accuracy rises with ε, so eps_monotone fires."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = torch.round(x.mean((1, 2, 3)) * 100) / 100
        spread = (x.flatten(1).std(1) > 0.05).float()  # no gradient through the comparison
        shift = (1 - spread) * (1.0 / C)  # unperturbed: read the next class
        return self.gain * _mean_logits(torch.remainder(m + shift, 1.0))


def run(model: nn.Module, attacks: list[str], eps: float = 0.1, **kw) -> dict:
    x, y = grey_levels()
    s = EvalSettings(eps=eps, aa_budget=kw.pop("aa_budget", FAST_AA))
    metrics, table = evaluate(model, x, y, CLASSES, attacks, s, checks=True, check_n=100, **kw)
    return {"m": metrics, "table": table, "names": {c["name"] for c in failed(metrics["checks"])}}


def test_sound_model_passes_every_check() -> None:
    r = run(MeanReader(), ["pgd", "cw", "aa"], eps=0.02)
    m = r["m"]
    assert {c["name"] for c in m["checks"]} == {
        "worst_case", "aa_vs_pgd", "gradient_masking", "eps_zero", "eps_monotone", "large_eps"}
    assert r["names"] == set(), m["checks"]
    assert m["sa"] == 1.0
    # ε = 0.02 < half the grey-level gap (0.05): the model is provably robust everywhere
    assert m["ra"]["pgd"] == m["ra"]["aa"] == m["ra"]["worst"] == 1.0
    assert m["eps_sweep"]["ra_pgd"][-1] == 0.0


def test_worst_case_is_elementwise_and_of_attacks() -> None:
    r = run(MeanReader(), ["pgd", "cw", "aa"], eps=0.05)  # about half broken
    t = r["table"]
    assert torch.equal(t["worst"], t["clean"] & t["pgd"] & t["cw"] & t["aa"])
    assert 0 < r["m"]["ra"]["worst"] < 1


def test_gradient_masking_fires_on_input_quantiser() -> None:
    r = run(QuantisedMeanReader(), ["pgd", "aa"])
    m = r["m"]
    assert m["ra"]["pgd"] == 1.0  # PGD stalls on zero gradients
    assert m["ra"]["aa"] < 0.2  # Square does not
    assert {"gradient_masking", "large_eps"} <= r["names"]
    c = next(c for c in m["checks"] if c["name"] == "gradient_masking")
    assert "gradient masking" in c["suggests"]
    assert any("zero gradient" in t for t in m["notes"])  # AutoAttack's own flag, passed on


def test_eps_zero_fires_on_stochastic_model() -> None:
    torch.manual_seed(0)
    r = run(Noisy(), ["pgd"])
    assert "eps_zero" in r["names"]
    c = next(c for c in r["m"]["checks"] if c["name"] == "eps_zero")
    assert "stochastic" in c["suggests"]


def test_eps_monotone_fires_when_accuracy_rises_with_eps() -> None:
    r = run(RightOnlyWhenPerturbed(), ["pgd"])
    sweep = r["m"]["eps_sweep"]["ra_pgd"]
    assert sweep[0] == 0.0 and max(sweep) > 0.5
    assert "eps_monotone" in r["names"]


def test_aa_vs_pgd_fires_on_a_misconfigured_autoattack(monkeypatch: pytest.MonkeyPatch) -> None:
    real = aa_mod.autoattack_correct

    def wrong_scale(model, x, y, eps, *a, **k):  # a classic bug: eps given in 0-255 units /255 twice
        return real(model, x, y, eps / 255, *a, **k)

    monkeypatch.setattr("dorat.evaluation.evaluate.autoattack_correct", wrong_scale)
    r = run(MeanReader(), ["pgd", "aa"], eps=0.08)
    assert r["m"]["ra"]["aa"] > r["m"]["ra"]["pgd"]
    assert "aa_vs_pgd" in r["names"]


def test_autoattack_official_settings_end_to_end() -> None:
    """Standard AutoAttack, no budget cut, on a tiny differentiable model."""
    x, y = grey_levels(n_per=2)
    x = x.float() / 255
    model = MeanReader().eval()
    notes: list[str] = []
    ok = autoattack_correct(model, x, y, eps=0.05, seed=0, warnings_out=notes)
    assert ok.dtype == torch.bool and ok.shape == y.shape
    # exact answer: the reachable means form [mean(clamp(x−ε)), mean(clamp(x+ε))]; a point is
    # robust iff that interval stays inside its class's cell (c/10, (c+1)/10)
    lo, hi = (x - 0.05).clamp(0, 1).mean((1, 2, 3)), (x + 0.05).clamp(0, 1).mean((1, 2, 3))
    robust = (lo > y / C) & (hi < (y + 1) / C)
    margin = torch.minimum((lo - y / C).abs(), (hi - (y + 1) / C).abs())
    clear = margin > 2e-3
    assert 0 < int(robust.sum()) < len(y)
    assert torch.equal(ok[clear], robust[clear])
    assert model.training is False


def test_autoattack_is_seeded_and_leaves_global_rng_alone() -> None:
    x, y = grey_levels(n_per=3)
    x = x.float() / 255
    model = QuantisedMeanReader().eval()
    torch.manual_seed(123)
    a = autoattack_correct(model, x, y, eps=0.06, seed=5, budget=FAST_AA)
    after = torch.rand(3)
    torch.manual_seed(123)
    b = autoattack_correct(model, x, y, eps=0.06, seed=5, budget=FAST_AA)
    assert torch.equal(a, b)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))  # AutoAttack's reseeding did not leak


def test_autoattack_runs_with_frozen_weights_and_finds_the_same_points() -> None:
    """The adapter freezes the parameters (input gradients only): what it finds equals a plain
    pyautoattack call, no weight gradient is left behind, and requires_grad is restored."""
    from pyautoattack import AutoAttack

    x, y = grey_levels(n_per=3)
    x = x.float() / 255
    model = MeanReader().eval()
    ours = autoattack_correct(model, x, y, eps=0.05, seed=1, budget=FAST_AA)
    assert 0 < int(ours.sum()) < len(y)  # some points robust, some broken
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    plain = AutoAttack(model, eps=0.05, norm="Linf", seed=1, version="standard", device=x.device)
    aa_mod._apply_budget(plain, FAST_AA)
    x_adv, _ = plain.run_standard_evaluation(x, y, batch_size=len(y))
    with torch.no_grad():
        assert torch.equal(ours, model(x_adv).argmax(1) == y)
    assert any(p.grad is not None for p in model.parameters())  # what freezing avoids


def test_adapter_accepts_the_git_autoattack_package(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {}

    class GitAutoAttack:  # the authors' package: positional norm/eps, bs=, returns x_adv only
        def __init__(self, model, norm="Linf", eps=0.3, seed=None, verbose=True, attacks_to_run=(),
                     version="standard", device="cuda", log_path=None):
            calls["init"] = dict(norm=norm, eps=eps, seed=seed, version=version, verbose=verbose)
            self.model, self.eps = model, eps

        def run_standard_evaluation(self, x, y, bs=250, return_labels=False):
            calls["bs"] = bs
            return (x + self.eps * torch.sign(0.5 - x)).clamp(0, 1)  # push towards grey

    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # not installed
    monkeypatch.setitem(sys.modules, "autoattack", types.SimpleNamespace(AutoAttack=GitAutoAttack))
    x, y = grey_levels(n_per=2)
    x = x.float() / 255
    model = MeanReader().eval()
    ok = autoattack_correct(model, x, y, eps=0.1, seed=3, batch_size=7)
    assert calls["init"] == dict(norm="Linf", eps=0.1, seed=3, version="standard", verbose=False)
    assert calls["bs"] == 7
    expected = model((x + 0.1 * torch.sign(0.5 - x)).clamp(0, 1)).argmax(1) == y
    assert torch.equal(ok, expected) and not expected.all()


def test_adapter_error_when_no_autoattack_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from dorat.errors import ConfigError

    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "autoattack", None)
    x, y = grey_levels(n_per=1)
    with pytest.raises(ConfigError, match="pip install pyautoattack"):
        autoattack_correct(MeanReader(), x.float() / 255, y, eps=0.1)
