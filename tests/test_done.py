"""DONE (METHODS.md §1): KL-DRO weights, running normaliser, hypergradients, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from dorat import config as C
from dorat.attacks.barrier import Barrier, barrier_attack
from dorat.objectives import StepContext, build_method
from dorat.objectives.base import LossOutput
from dorat.objectives.done import KLDROWeighting
from dorat.objectives.hypergrad import implicit_term
from dorat.runs.run import train


def _kl(r: float, beta: float = 0.2, num_classes: int = 10, class_prior: list[float] | None = None,
        **kw: object) -> KLDROWeighting:
    """A bound KL-DRO weighting (what build_method does with the data's facts)."""
    kw.setdefault("warmup", 0)
    wt = KLDROWeighting(r, beta, **kw)  # type: ignore[arg-type]
    wt.bind({"num_classes": num_classes, "class_counts": class_prior})
    return wt


def _w(weighting: KLDROWeighting, loss: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.zeros(len(loss), dtype=torch.long) if y is None else y
    return weighting.weights(LossOutput(loss, None), y, None, StepContext(0, 1, 0))


def test_beta_1_full_batch_gives_exact_softmax() -> None:
    loss = torch.tensor([0.1, 2.0, 0.5, 3.3, 1.2], dtype=torch.float64)
    for r in (0.3, 1.0, 7.0):
        w = _w(_kl(r, beta=1.0), loss)
        assert torch.allclose(w, torch.softmax(loss / r, 0), rtol=1e-12, atol=0)


def test_huge_loss_over_r_stays_finite_with_exact_ratios() -> None:
    r = 1e-3
    loss = torch.tensor([10.0, 9.99, 9.995, 0.0, 5.0], dtype=torch.float64)  # ℓ/r up to 1e4
    wt = _kl(r, beta=0.3)
    _w(wt, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))  # a stale u first
    w = _w(wt, loss)
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert w.max() <= 1 / 0.3 + 1e-12  # u_t holds β·exp(ℓ_max/r)/|B|, so ŵ ≤ 1/β always
    assert math.log(w[0] / w[1]) == pytest.approx((10.0 - 9.99) / r, rel=1e-9)
    assert math.log(w[0] / w[2]) == pytest.approx((10.0 - 9.995) / r, rel=1e-9)
    assert w[3] == 0.0  # exp(-1e4) underflows to exactly 0, not NaN
    f32 = _w(_kl(1e-2, beta=0.5), torch.tensor([100.0, 99.0, 0.0]))
    assert torch.isfinite(f32).all() and f32.dtype == torch.float32


def test_running_normaliser_converges_to_population_mean() -> None:
    r, beta = 2.0, 0.05
    wt = _kl(r, beta)
    torch.manual_seed(0)
    # losses ~ Gamma(k=2, rate=1.5): E[exp(ℓ/r)] = (1 − 1/(r·rate))^(−k)
    stream = torch.distributions.Gamma(torch.tensor(2.0), torch.tensor(1.5)).sample((2000, 128))
    truth = (1 - 1 / (r * 1.5)) ** -2.0
    logs = []
    for t, batch in enumerate(stream.double()):
        _w(wt, batch)
        if t >= 500:
            logs.append(float(wt.log_u))
    assert abs(math.exp(logs[-1]) / truth - 1) < 0.02
    est = sum(math.exp(v) for v in logs) / len(logs)
    assert abs(est / truth - 1) < 0.02


def test_large_r_reproduces_pgd_at_gradient(synthetic_npz: Path) -> None:
    from dorat.runs.run import prepare

    grads = {}
    for method in ("at", "done"):
        cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "method": method},
                        ["done.r=1e6", "done.warmup=0", "attack.steps=3"])
        run = prepare(cfg)
        x = run.train.x[:64].float() / 255
        y = run.train.y[:64]
        gen = torch.Generator().manual_seed(5)
        out = run.method.step(run.model, x, y, StepContext(0, 1, 0, gen))
        run.model.zero_grad()
        out.objective.backward()
        grads[method] = torch.cat([p.grad.flatten() for p in run.model.parameters()])
    assert torch.allclose(grads["done"], grads["at"], rtol=1e-4, atol=1e-7)


def test_class_prior_uniform_centres_the_class_ball_on_the_balanced_distribution() -> None:
    """done.class_prior=uniform: at large r the class level gives class-balanced weights
    (example of class c: |B| / (C n_c,B) / |B|) whatever the training frequencies; the
    default keeps the training prior (uniform weights)."""
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    loss = torch.tensor([1.0, 1.2, 0.8, 2.0, 2.2, 0.1], dtype=torch.float64)
    info = {"num_classes": 3, "class_counts": [300, 200, 100]}
    for prior, expect in (("train", [1 / 6] * 6),
                          ("uniform", [1 / 9] * 3 + [1 / 6] * 2 + [1 / 3])):
        cfg = C.resolve(None, {"method": "done-class"},
                        ["done.r=1e9", "done.beta=1", "done.warmup=0",
                         f"done.class_prior={prior}"])
        weighting = build_method(cfg, info).weighting
        w = _w(weighting, loss, y)
        assert torch.allclose(w, torch.tensor(expect, dtype=torch.float64), rtol=1e-6), prior
    with pytest.raises(C.ConfigError, match="class_prior"):
        C.resolve(None, {"method": "done-class"}, ["done.class_prior=test"])


def test_class_level_weights() -> None:
    y = torch.tensor([0, 0, 0, 1, 1, 2])
    loss = torch.tensor([1.0, 1.2, 0.8, 2.0, 2.2, 0.1], dtype=torch.float64)
    prior = [3.0, 2.0, 1.0]
    # r → ∞: π = prior, every example gets 1/|B| when the batch matches the prior
    w = _w(_kl(1e9, 1.0, level="class", num_classes=3, class_prior=prior), loss, y)
    assert torch.allclose(w, torch.full((6,), 1 / 6, dtype=torch.float64), rtol=1e-6)
    r = 0.5
    w = _w(_kl(r, 1.0, level="class", num_classes=3, class_prior=prior), loss, y)
    L = torch.tensor([1.0, 2.1, 0.1], dtype=torch.float64)
    pi = torch.softmax(torch.log(torch.tensor(prior, dtype=torch.float64) / 6) + L / r, 0)
    expect = pi[y] / torch.tensor([3, 3, 3, 2, 2, 1], dtype=torch.float64)
    assert torch.allclose(w, expect, rtol=1e-10)
    assert torch.allclose(w[:3], w[0].expand(3))  # same class, same weight
    mixed = _w(_kl(r, 1.0, level="mixed", num_classes=3, class_prior=prior), loss, y)
    # class totals as in class level; inside a class, softmax of ℓ/r
    for c in range(3):
        assert mixed[y == c].sum() == pytest.approx(float(w[y == c].sum()), rel=1e-10)
    inner = torch.softmax(loss[:3] / r, 0)
    assert torch.allclose(mixed[:3] / mixed[:3].sum(), inner, rtol=1e-10)


def test_warmup_is_uniform_and_switches_on_time() -> None:
    wt = _kl(0.5, 0.5, warmup=2)
    loss = torch.tensor([0.1, 3.0])
    for epoch, reweighted in [(0, False), (1, False), (2, True), (3, True)]:
        wt.start_epoch(epoch, 4)
        w = wt.weights(LossOutput(loss, None), torch.zeros(2, dtype=torch.long), None,
                       StepContext(epoch, 4, 0))
        assert wt.epoch_log()["reweighting"] == reweighted
        assert (w[1] > w[0]) == reweighted, epoch
        assert wt.log_u is not None  # the normaliser keeps tracking during warm-up


def test_target_ess_adapts_r() -> None:
    wt = _kl(0.05, 0.5, target_ess=0.5)
    g = torch.Generator().manual_seed(0)
    rs = []
    for epoch in range(12):
        wt.start_epoch(epoch, 12)
        for _ in range(20):
            _w(wt, torch.rand(128, generator=g) * 3)
        rs.append(wt.r)
    assert rs[0] == 0.05 and rs[-1] > 0.2  # too peaked at r = 0.05: r grows
    ess = wt.epoch_log()["ess_dro"]
    assert abs(ess - 0.5) < 0.1, (ess, rs)


# -- hypergradient against finite differences -----------------------------------------------

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.l1 = nn.Linear(6, 5).double()
        self.l2 = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


def _solve_lower(model: nn.Module, x: torch.Tensor, y: torch.Tensor, b: Barrier) -> torch.Tensor:
    """δ* = argmin −CE + (λ/2)‖δ‖² − c Σ log(ε ± δ), by damped Newton to machine precision."""
    delta = torch.zeros_like(x)

    def obj(d: torch.Tensor) -> torch.Tensor:
        return -F.cross_entropy(model(x + d), y, reduction="sum") + b.penalty(d).sum()

    for _ in range(100):
        g = torch.autograd.functional.jacobian(obj, delta).reshape(-1)
        H = torch.autograd.functional.hessian(obj, delta).reshape(g.numel(), g.numel())
        step = torch.linalg.solve(H, g).view_as(delta)
        t = 1.0
        while (delta - t * step).abs().max() >= b.eps or obj(delta - t * step) > obj(delta):
            t /= 2
        delta = delta - t * step
        if g.abs().max() < 1e-13:
            break
    return delta.detach()


def test_cg_hypergradient_matches_finite_differences() -> None:
    model = Tiny()
    x = 0.3 + 0.4 * torch.rand(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1])
    b = Barrier(eps=0.1, c=1e-3, lam=2.0)
    params = list(model.parameters())

    def outer(theta: list[torch.Tensor]) -> float:
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)
        with torch.enable_grad():
            d = _solve_lower(model, x, y, b)
        return float(F.cross_entropy(model(x + d), y).detach())

    theta0 = [p.detach().clone() for p in params]
    direction = [torch.randn(p.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
                 for i, p in enumerate(params)]
    h = 1e-5
    fd = (outer([t + h * d for t, d in zip(theta0, direction)])
          - outer([t - h * d for t, d in zip(theta0, direction)])) / (2 * h)
    outer(theta0)
    delta_star = _solve_lower(model, x, y, b)
    errors = {}
    for kind in ("none", "diag", "cg"):
        model.zero_grad()
        delta = delta_star.clone().requires_grad_(True)
        loss = F.cross_entropy(model(x + delta), y, reduction="none")
        total = loss.sum()
        if kind != "none":
            total = total + implicit_term(loss, delta, x + delta_star, b, kind, torch.ones(1),
                                          cg_iters=12, damping=0.0)
        total.backward()
        dd = sum(float((p.grad * d).sum()) for p, d in zip(params, direction))
        errors[kind] = abs(dd - fd) / abs(fd)
    print("relative errors vs finite differences:", errors)
    assert errors["cg"] <= 1e-3
    assert errors["diag"] > 10 * errors["cg"] and errors["none"] > 10 * errors["cg"]


def test_barrier_attack_stays_strictly_inside_and_raises_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x = torch.rand(8, 1, 4, 4)
    x[0] = 0.0
    y = torch.randint(0, 4, (8,))
    b = Barrier(eps=0.1, c=1e-4)
    base = F.cross_entropy(model(x), y)
    for opt, lr in (("gd", 0.05), ("adam", 0.02)):
        r = barrier_attack(model, x, y, b, 20, lr, opt, generator=torch.Generator().manual_seed(0))
        d = r.x_adv - x
        assert d.abs().max() < 0.1 and r.x_adv.min() >= 0 and r.x_adv.max() <= 1
        assert F.cross_entropy(model(r.x_adv), y) > base


# -- end to end ------------------------------------------------------------------------------

def _cfg(npz: Path, method: str, *sets: str) -> dict:
    return C.resolve(None, {"dataset": f"npz:{npz}", "epochs": 3, "batch_size": 64,
                            "method": method},
                     ["attack.steps=2", "attack.alpha=0.05", "eval.n=40", "eval.steps=2",
                      "optim.lr=0.02", "done.r=2.0", *sets])


def test_done_resume_equals_uninterrupted_including_u(tmp_path: Path, synthetic_npz: Path) -> None:
    cfg = _cfg(synthetic_npz, "done", "done.target_ess=0.6")
    full = train(cfg, tmp_path / "full", log=lambda s: None)
    train(cfg, tmp_path / "part", stop_after_epoch=1, log=lambda s: None)
    resumed = train(cfg, tmp_path / "part", resume=True, log=lambda s: None)
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    la = [json.loads(s) for s in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(s) for s in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["log_u"] for r in la] == [r["log_u"] for r in lb]
    assert [r["r"] for r in la] == [r["r"] for r in lb]
    assert full["ra"] == resumed["ra"]


@pytest.mark.parametrize("method,sets", [
    ("done", []), ("done-cid", []), ("done-class", []),
    ("done", ["done.hypergrad=diag"]), ("done", ["done.level=mixed", "done.warmup=1"]),
    ("done-cid", ["done.lower=barrier-adam"]),
])
def test_done_variants_train_and_log_diagnostics(tmp_path: Path, synthetic_npz: Path, method: str,
                                                 sets: list[str]) -> None:
    m = train(_cfg(synthetic_npz, method, "epochs=2", *sets), tmp_path / "r", log=lambda s: None)
    assert m["sa"] > 0.5
    rec = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[-1])
    for key in ("ess", "w_max", "w_class_mean", "r", "ess_dro"):
        assert key in rec
    assert 0 < rec["ess"] <= 1 and len(rec["w_class_mean"]) == 4
    saved = C.load_yaml(str(tmp_path / "r" / "config.yaml"))[0]
    if method == "done-cid":
        assert saved["method"]["hypergrad"] == "cg" and saved["method"]["attack"].startswith("barrier")


def test_cifar_shaped_smoke(tmp_path: Path) -> None:
    from conftest import make_synthetic_npz

    npz = make_synthetic_npz(tmp_path / "c.npz", n_train=64, n_test=20, size=32, channels=3,
                             num_classes=10)
    for method in ("done", "done-cid"):
        # the paper's PreAct-ResNet-18 at a quarter of its width (the same blocks, 1/16 the FLOPs)
        m = train(C.resolve(None, {"dataset": f"npz:{npz}", "epochs": 1, "batch_size": 32,
                                   "model": "preact-resnet18-w16", "method": method},
                            ["attack.eps=0.0313", "attack.alpha=0.0078", "attack.steps=2",
                             "eval.n=20", "eval.steps=2", "eval.checks=false", "done.cg_iters=2"]),
                  tmp_path / method, log=lambda s: None)
        assert len(m["per_class"]["pgd"]) == 10


def test_preset_overrides_can_be_overridden() -> None:
    cfg = C.resolve(None, {"method": "done-cid"}, ["done.hypergrad=diag"])  # the old key: an alias
    assert cfg.method.attack == "barrier-gd" and cfg.method.hypergrad == "diag"
    assert cfg.method.name == "barrier-gd×ce×kl-dro×diag"  # no longer the preset: says what it is
    assert build_method(cfg).describe()["hypergrad"] == "diag"
    with pytest.raises(Exception, match="beta"):
        C.resolve(None, {"method": "done"}, ["done.beta=1.5"])


# -- properties over arbitrary loss vectors (hypothesis) -------------------------------------

_losses = st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_losses, _losses, st.floats(1e-3, 1e3), st.floats(0.01, 1.0), st.floats(-50, 50))
def test_weights_finite_nonnegative_monotone_shift_invariant(first: list[float], batch: list[float],
                                                             r: float, beta: float,
                                                             shift: float) -> None:
    wt = _kl(r, beta, warmup=0)
    _w(wt, torch.tensor(first, dtype=torch.float64))
    loss = torch.tensor(batch, dtype=torch.float64)
    w = _w(wt, loss)
    assert torch.isfinite(w).all() and (w >= 0).all() and w.max() <= 1 / beta * (1 + 1e-9)
    order = torch.argsort(loss)
    assert (w[order].diff() >= -1e-15).all()  # a larger loss never gets a smaller weight
    # with u re-estimated on the batch itself (beta = 1), adding a constant changes nothing
    a = _w(_kl(r, 1.0, warmup=0), loss)
    b = _w(_kl(r, 1.0, warmup=0), loss + shift)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-300)


def test_max_weight_caps_only_the_largest_weights() -> None:
    loss = torch.tensor([0.1, 0.2, 0.3, 5.0, 9.0], dtype=torch.float64)
    free = _w(_kl(1.0, 1.0, warmup=0), loss)
    capped = _w(_kl(1.0, 1.0, warmup=0, max_weight=1.5), loss)
    n = len(loss)
    assert free.max() > 1.5 / n and torch.all(capped <= 1.5 / n + 1e-15)
    small = free <= 1.5 / n
    assert torch.equal(capped[small], free[small])  # the rest is untouched
    with pytest.raises(Exception, match="max_weight"):
        C.resolve(None, {"method": "done"}, ["done.max_weight=0.5"])


def test_concentrated_weights_are_named_once_with_the_knobs(tmp_path: Path, synthetic_npz: Path) -> None:
    """At a tiny temperature DONE puts the batch on a few examples: the run says so once (not
    every epoch), naming done.r and done.target_ess; at the default it says nothing."""
    from dorat.training.advice import ESS_WARN, W_MAX_WARN, concentration

    def run(r: float, name: str) -> list[str]:
        cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "method": "done", "epochs": 2,
                               "batch_size": 64}, ["attack.steps=1", "eval.n=20", "eval.checks=false",
                                                   "eval.steps=1", "done.warmup=0", f"done.r={r}"])
        lines: list[str] = []
        train(cfg, tmp_path / name, log=lines.append)
        return [s for s in lines if "weights concentrate" in s]

    warned = run(0.01, "cold")
    assert len(warned) == 1 and "done.r" in warned[0] and "done.target_ess" in warned[0], warned
    assert run(1.0, "warm") == []
    assert concentration({"epoch": 1, "ess": ESS_WARN, "w_max": W_MAX_WARN}, "kl-dro") is None
    assert "soften" in concentration({"epoch": 3, "ess": 0.02, "w_max": 5.0}, "gairat")
