"""The robust-fairness family and its seams: FRL's and WAT's update rules on hand-computed cases,
DONE's class-level DRO on validation losses, class-wise attack radii, the weighted base term,
DONE's batch normaliser, and the errors and warnings around them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dorat import config as C
from dorat.attacks import PGDSpec, pgd
from dorat.compare import comparability_warnings, load_grid
from dorat.errors import ConfigError
from dorat.evaluation.probe import ClassStats
from dorat.objectives import LossOutput, StepContext, build_method
from dorat.objectives.done import KLDROWeighting
from dorat.objectives.fairness import CFAWeighting, DAFAWeighting, FRLWeighting, WATWeighting
from dorat.runs.run import train


def _stats(clean: list[float], robust: list[float], loss: list[float] | None = None,
           kl: list[float] | None = None) -> ClassStats:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    n = len(clean)
    return ClassStats(t(clean), t(robust), t(loss or [0.0] * n), t(loss or [0.0] * n), t(kl or [0.0] * n),
                      sum(clean) / n, sum(robust) / n, 0.0)


def test_frl_multipliers_weights_and_margins_by_hand() -> None:
    frl = FRLWeighting(reweight=True, remargin=True, tau_clean=0.05, tau_boundary=0.0, rate=0.5,
                       rate_margin=0.2, lim=0.5, max_margin=3.0, warmup=0)
    frl.bind({"num_classes": 3})
    s = _stats([0.1, 0.2, 0.6], [0.3, 0.5, 0.9])
    frl.start_epoch(0, 10, lambda: s)
    # clean: total 0.3, γ0 = err − 0.3 − 0.05 = [−0.25, −0.15, 0.25]; λ0 = max(0, 0.5·γ0)
    assert frl.lam[0].tolist() == pytest.approx([0, 0, 0.125])
    # boundary [0.2, 0.3, 0.3], total 0.5667 − 0.3: γ1 = [−1/15, 1/30, 1/30]; λ1 = max(0, 2·0.5·γ1)
    assert frl.lam[1].tolist() == pytest.approx([0, 1 / 30, 1 / 30])
    # λ2 = 0.2·γ1 (not clamped); margins exp(2λ2) clamped to [0.98, 3]
    assert frl.lam[2].tolist() == pytest.approx([-0.2 / 15, 0.2 / 30, 0.2 / 30])
    assert frl.class_eps().tolist() == pytest.approx([0.98, math.exp(0.4 / 30), math.exp(0.4 / 30)])
    assert frl.epoch_log()["lambda"][0] == pytest.approx([0, 0, 0.125])  # the multipliers are logged
    # class weights 1/C + λ − mean(λ): clean [1/3 − 1/24, 1/3 − 1/24, 1/3 + 1/12]
    third = 0.125 / 3
    assert frl.class_weights(0).tolist() == pytest.approx([1 / 3 - third, 1 / 3 - third, 1 / 3 + 2 * third])
    y = torch.tensor([0, 2, 2, 1])
    out = LossOutput(torch.ones(4), None, base=torch.ones(4))
    w = frl.weights(out, y, None, StepContext(0, 10, 0))
    cw = frl.class_weights(1)[y].float()
    assert torch.allclose(w, cw / cw.sum()) and float(w.sum()) == pytest.approx(1.0)
    wb = frl.base_weights(out, y, StepContext(0, 10, 0))
    assert float(wb.sum()) == pytest.approx(1.0) and wb[1] > wb[0]  # the worst class weighs most
    # the simplex bound: the reweight multipliers never hold more than lim in total
    for _ in range(20):
        frl.start_epoch(1, 10, lambda: s)
    assert float(frl.lam[0].sum()) <= 0.5 + 1e-12 and float(frl.lam[1].sum()) <= 0.5 + 1e-12


def test_frl_is_uniform_during_warmup_and_does_not_probe() -> None:
    frl = FRLWeighting(warmup=2)
    frl.bind({"num_classes": 3})
    frl.start_epoch(1, 10, lambda: pytest.fail("probed during the warm-up"))
    out = LossOutput(torch.ones(3), None)
    assert torch.allclose(frl.weights(out, torch.tensor([0, 1, 2]), None, StepContext(1, 10, 0)),
                          torch.full((3,), 1 / 3))
    assert frl.class_eps() is None and frl.base_weights(out, torch.tensor([0]), StepContext(1, 10, 0)) is None


def test_wat_hedge_by_hand() -> None:
    cfg = C.resolve(None, {"method": "wat"})
    wat = WATWeighting(eta=0.5)
    wat.bind({"num_classes": 2, "cfg": cfg})
    y = torch.tensor([0, 1, 1])
    out = LossOutput(torch.ones(3), None, base=torch.ones(3))
    ctx = StepContext(0, 5, 0)
    wat.start_epoch(0, 5, lambda: pytest.fail("WAT probes after an epoch of training"))
    assert torch.allclose(wat.weights(out, y, None, ctx), torch.full((3,), 2 / 3))  # official: all ones
    s = _stats([0, 0], [0, 0], loss=[1.0, 2.0], kl=[0.5, 0.25])
    wat.start_epoch(1, 5, lambda: s)
    cost = [1 + 6 * 0.5, 2 + 6 * 0.25]  # clean CE + β·KL, β = trades.beta = 6
    experts = cost + [sum(cost) / 2]
    f = [math.exp(0.5 * c) for c in experts]
    w = [2 * v / sum(f) for v in f]
    assert wat.w.tolist() == pytest.approx(w)
    got = wat.weights(out, y, None, StepContext(1, 5, 0))
    assert got.tolist() == pytest.approx([(w[0] + w[2]) / 3, (w[1] + w[2]) / 3, (w[1] + w[2]) / 3], rel=1e-6)
    wat.start_epoch(2, 5, lambda: s)  # cumulative: the costs add up
    f2 = [math.exp(0.5 * 2 * c) for c in experts]
    assert wat.w.tolist() == pytest.approx([2 * v / sum(f2) for v in f2])
    # normalise: divided by mean_c(w_c) + w_avg, so equal class weights are plain training's 1/|B|
    norm = WATWeighting(eta=0.5, normalise=True)
    norm.bind({"num_classes": 2, "cfg": cfg})
    assert torch.allclose(norm.weights(out, y, None, ctx), torch.full((3,), 1 / 3))
    norm.start_epoch(1, 5, lambda: s)
    scale = (w[0] + w[1]) / 2 + w[2]
    got = norm.weights(out, y, None, StepContext(1, 5, 0))
    assert got.tolist() == pytest.approx([(w[0] + w[2]) / (3 * scale), (w[1] + w[2]) / (3 * scale),
                                          (w[1] + w[2]) / (3 * scale)], rel=1e-6)


def test_cfa_margins_betas_and_fawa_by_hand() -> None:
    cfg = C.resolve(None, {"method": "trades-cfa"})
    cfa = CFAWeighting(ccm=True, ccr=True, lambda_margin=0.5, lambda_beta=0.5, fawa=True, fawa_decay=0.5,
                       fawa_decay_epochs=5, fawa_threshold=0.3, warmup=0)  # 0.5 per epoch of these 5
    cfa.bind({"num_classes": 2, "cfg": cfg})
    y = torch.tensor([0, 0, 1, 1])
    # class 0: 1 of 2 right under attack, class 1: 2 of 2
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 5.0], [0.0, 5.0]])
    out = LossOutput(torch.ones(4), logits, base=torch.ones(4))
    cfa.start_epoch(0, 5)
    assert torch.allclose(cfa.weights(out, y, None, StepContext(0, 5, 0)), torch.full((4,), 0.25))
    cfa.start_epoch(1, 5)  # r = [0.5, 1.0] from the epoch before
    assert cfa.class_eps().tolist() == pytest.approx([1.0, 1.5])  # (λ1 + r_c)
    k = torch.tensor([1.0, 1.0, 1.5, 1.5], dtype=torch.float64)
    beta_c = k * 6 / (1 + k * 6)  # β_c = (λ2 + r_c)β / (1 + (λ2 + r_c)β)
    w = cfa.weights(out, y, None, StepContext(1, 5, 0))
    wb = cfa.base_weights(out, y, StepContext(1, 5, 0))
    # (1 + β)·[(1 − β_c)·CE + β_c·KL]: at TRADES' own scale (CE + β·KL when β_c = β/(1 + β));
    # the loss is β·KL, so KL's weight is (1 + β)·β_c/β
    assert w.double().tolist() == pytest.approx((7 * beta_c / 6 / 4).tolist(), rel=1e-6)
    assert wb.double().tolist() == pytest.approx((7 * (1 - beta_c) / 4).tolist(), rel=1e-6)
    cfa.robust = torch.tensor([0.5, 0.5])  # λ2 + r_c = 1: β_c = β/(1 + β), plain TRADES
    assert cfa.weights(out, y, None, StepContext(1, 5, 0)).tolist() == pytest.approx([0.25] * 4, rel=1e-6)
    assert cfa.base_weights(out, y, StepContext(1, 5, 0)).tolist() == pytest.approx([0.25] * 4, rel=1e-6)
    cfa.robust = torch.tensor([0.5, 1.0])
    assert cfa.epoch_log()["class_beta"] == pytest.approx([6 / 7, 9 / 10], rel=1e-4)  # logged per class
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    cfa.end_epoch(1, 5, lambda: _stats([0, 0], [0.5, 0.6]), model)  # worst class 0.4 >= 0.3: in
    with torch.no_grad():
        model.weight.fill_(3.0)
    cfa.end_epoch(2, 5, lambda: _stats([0, 0], [0.9, 0.1]), model)  # worst 0.1 < 0.3: left out
    cfa.end_epoch(3, 5, lambda: _stats([0, 0], [0.5, 0.5]), model)  # in: 0.5·1 + 0.5·3
    assert torch.allclose(cfa.final_state()["weight"], torch.full((2, 2), 2.0))
    # the official 0.88 per epoch of 200 spans the same share of an 8-epoch run: 0.88^25 per epoch
    assert CFAWeighting().epoch_decay(8) == pytest.approx(0.88 ** 25)
    assert CFAWeighting().epoch_decay(200) == pytest.approx(0.88)
    assert CFAWeighting(fawa_decay_epochs=0).epoch_decay(8) == pytest.approx(0.88)  # as given


def test_dafa_class_weights_by_hand() -> None:
    dafa = DAFAWeighting(lam=1.0, warmup=1)
    dafa.bind({"num_classes": 3, "cfg": C.resolve(None, {"method": "dafa"})})
    p = torch.tensor([[0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.0, 0.1, 0.9]], dtype=torch.float64)
    # p_ii = [0.5, 0.7, 0.9]: class 0 is the hardest and gains p01·p11 + p02·p22; class 1 gains
    # p12·p22 from the easier 2 and loses p01·p11 to the harder 0; class 2 loses p02·p22 + p12·p22
    expect = [1 + 0.4 * 0.7 + 0.1 * 0.9, 1 - 0.4 * 0.7 + 0.1 * 0.9, 1 - 0.1 * 0.9 - 0.1 * 0.9]
    assert dafa.class_weights(p).tolist() == pytest.approx(expect)
    y = torch.tensor([0, 1, 2, 0])
    logits = torch.log(p[y].float())
    dafa.start_epoch(0, 4)  # the last warm-up epoch: collect the adversarial softmax per class
    out = LossOutput(torch.ones(4), logits, base=torch.ones(4))
    assert torch.allclose(dafa.weights(out, y, None, StepContext(0, 4, 0)), torch.full((4,), 0.25))
    dafa.start_epoch(1, 4)
    assert dafa.class_eps().tolist() == pytest.approx(expect, rel=1e-5)
    wb = dafa.base_weights(out, y, StepContext(1, 4, 0))  # TRADES: the clean CE is weighted, KL not
    assert wb.tolist() == pytest.approx([expect[i] / 4 for i in (0, 1, 2, 0)], rel=1e-5)
    assert torch.allclose(dafa.weights(out, y, None, StepContext(1, 4, 0)), torch.full((4,), 0.25))


def test_done_val_takes_its_class_losses_from_the_validation_probe() -> None:
    wt = KLDROWeighting(r=0.5, beta=0.2, warmup=0, level="class-val", class_prior="uniform")
    wt.bind({"num_classes": 3})
    assert wt.needs_validation()
    s = _stats([0, 0, 0], [0, 0, 0], loss=[1.0, 2.0, 0.5])
    wt.start_epoch(0, 4, lambda: s)
    y = torch.tensor([0, 1, 1, 2])
    loss = LossOutput(torch.tensor([9.0, 0.0, 1.0, 9.0]), None)
    w = wt.weights(loss, y, None, StepContext(0, 4, 0))
    pi = torch.softmax(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) / 0.5, 0)
    expect = (pi / torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))[y]  # π_c / n_c, batch losses ignored
    assert torch.allclose(w.double(), expect.float().double(), rtol=1e-6)
    # mixed-val: the same class weights, and inside class 1 the instances by exp(ℓ/r) / mean
    mixed = KLDROWeighting(r=0.5, beta=0.2, warmup=0, level="mixed-val", class_prior="uniform")
    mixed.bind({"num_classes": 3})
    assert mixed.needs_validation()
    mixed.start_epoch(0, 4, lambda: s)
    inner = torch.tensor([1.0, 2 / (1 + math.e ** 2), 2 * math.e ** 2 / (1 + math.e ** 2), 1.0])
    got = mixed.weights(loss, y, None, StepContext(0, 4, 0))
    assert torch.allclose(got.double(), (expect * inner.double()).float().double(), rtol=1e-6)


def test_done_val_rate_averages_the_class_losses_over_epochs() -> None:
    """val_rate η: L̄_t = (1 − η) L̄_{t−1} + η L_t, the first measurement taken as it is; before
    it (warm-up) the weights are uniform."""
    wt = KLDROWeighting(r=1.0, warmup=1, level="class-val", class_prior="uniform", val_rate=0.25)
    wt.bind({"num_classes": 2})
    y = torch.tensor([0, 1])
    out = LossOutput(torch.tensor([5.0, 0.0]), None)
    wt.start_epoch(0, 3, lambda: _stats([0, 0], [0, 0], loss=[9.0, 9.0]))  # warm-up: not measured
    assert wt.class_loss is None
    assert wt.weights(out, y, None, StepContext(0, 3, 0)).tolist() == [0.5, 0.5]
    wt.start_epoch(1, 3, lambda: _stats([0, 0], [0, 0], loss=[2.0, 1.0]))
    assert wt.class_loss.tolist() == [2.0, 1.0]
    wt.start_epoch(2, 3, lambda: _stats([0, 0], [0, 0], loss=[0.0, 3.0]))
    assert wt.class_loss.tolist() == [0.75 * 2.0, 0.75 * 1.0 + 0.25 * 3.0]
    w = wt.weights(out, y, None, StepContext(2, 3, 0))
    pi = torch.softmax(torch.tensor([1.5, 1.5], dtype=torch.float64), 0)
    assert w.tolist() == pytest.approx(pi.tolist())


def test_done_val_inverse_t_is_hedge_on_the_cumulative_validation_loss() -> None:
    """r_schedule=inverse-t: after t measurements π ∝ p·exp(Σ_s L_s / r) (the mean of the
    measurements at r/t), which a checkpoint carries over; other levels and a val_rate < 1
    are refused before training."""
    wt = KLDROWeighting(r=2.0, warmup=1, level="class-val", class_prior="uniform",
                        r_schedule="inverse-t")
    wt.bind({"num_classes": 2})
    y = torch.tensor([0, 1, 1])
    out = LossOutput(torch.tensor([5.0, 0.0, 1.0]), None)
    wt.start_epoch(1, 4, lambda: _stats([0, 0], [0, 0], loss=[2.0, 1.0]))
    assert wt.class_r() == 2.0 and wt.class_loss.tolist() == [2.0, 1.0]
    wt.start_epoch(2, 4, lambda: _stats([0, 0], [0, 0], loss=[0.0, 3.0]))
    assert wt.class_r() == 1.0 and wt.class_loss.tolist() == [1.0, 2.0]  # mean, at r/2
    e0, e1 = math.exp((2.0 + 0.0) / 2), math.exp((1.0 + 3.0) / 2)  # exp(Σ L / r)
    pi = [e0 / (e0 + e1), e1 / (e0 + e1)]
    w = wt.weights(out, y, None, StepContext(2, 4, 0))
    assert w.tolist() == pytest.approx([pi[0], pi[1] / 2, pi[1] / 2])  # π_c / n_c
    assert wt.epoch_log()["r_class"] == 1.0
    resumed = KLDROWeighting(r=2.0, warmup=1, level="class-val", class_prior="uniform",
                             r_schedule="inverse-t")
    resumed.bind({"num_classes": 2})
    resumed.load_state_dict(wt.state_dict())
    resumed.start_epoch(3, 4, lambda: _stats([0, 0], [0, 0], loss=[4.0, 2.0]))
    assert resumed.class_r() == pytest.approx(2 / 3)
    assert resumed.class_loss.tolist() == pytest.approx([2.0, 2.0])  # (2 + 0 + 4) / 3, (1 + 3 + 2) / 3
    with pytest.raises(ConfigError, match="r_schedule=inverse-t anneals the class-val temperature"):
        C.resolve(None, {"method": "done"}, ["done.r_schedule=inverse-t"])
    with pytest.raises(ConfigError, match="leave done.val_rate at 1"):
        C.resolve(None, {"method": "done-val"}, ["done.r_schedule=inverse-t", "done.val_rate=0.5"])


def test_batch_normaliser_is_the_self_normalised_softmax() -> None:
    loss = torch.tensor([0.1, 2.0, 0.5, 3.0])
    batch = KLDROWeighting(r=0.7, beta=0.1, warmup=0, normaliser="batch")
    running = KLDROWeighting(r=0.7, beta=0.1, warmup=0)
    for wt in (batch, running):
        wt.bind({"num_classes": 10})
    y = torch.zeros(4, dtype=torch.long)
    for scale in (1.0, 5.0):  # the losses jump: running's weight sum drifts, batch's does not
        wb = batch.weights(LossOutput(loss * scale, None), y, None, StepContext(0, 1, 0))
        wr = running.weights(LossOutput(loss * scale, None), y, None, StepContext(0, 1, 0))
        assert torch.allclose(wb, torch.softmax(loss * scale / 0.7, 0))
        assert float(wb.sum()) == pytest.approx(1)
    assert float(wr.sum()) > 2  # the running normaliser lags the jump: Σŵ far above 1
    mean = KLDROWeighting(r=0.7, beta=1.0, warmup=0, normaliser="batch", rescale="mean")
    mean.bind({"num_classes": 10})
    w1 = mean.weights(LossOutput(loss, None), y, None, StepContext(0, 1, 0))
    w5 = mean.weights(LossOutput(loss * 5, None), y, None, StepContext(0, 1, 0))
    assert torch.allclose(w1, w5)  # rescale=mean: r does not depend on the loss scale


def test_pgd_with_class_wise_radii_stays_in_each_ball() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.rand(6, 1, 4, 4) * 0.5 + 0.25
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    eps = torch.tensor([0.02, 0.05, 0.1, 0.02, 0.05, 0.1])
    r = pgd(model, x, y, PGDSpec(eps, eps / 4, 10), generator=torch.Generator().manual_seed(0))
    d = (r.x_adv - x).flatten(1).abs().amax(1)
    assert (d <= eps + 1e-6).all() and (d >= 0.9 * eps).all()  # linear model: each reaches its radius


def test_remargin_attacks_each_class_at_its_radius() -> None:
    cfg = C.resolve(None, {"method": "frl-rm"}, ["frl.warmup=0", "attack.steps=5"])
    m = build_method(cfg, {"num_classes": 3})
    m.weighting.start_epoch(0, 1, lambda: _stats([0.1, 0.1, 0.1], [0.2, 0.3, 0.9]))
    scale = m.weighting.class_eps()
    assert scale is not None and scale[2] > 1 and scale[0] == pytest.approx(0.98)
    seen = {}

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen["x"] = x.detach()
            return self.lin(x.flatten(1))

    model, x, y = Spy(), torch.full((3, 1, 4, 4), 0.5), torch.tensor([0, 1, 2])
    ctx = StepContext(0, 1, 0, torch.Generator().manual_seed(0))
    out = m.step(model, x, y, ctx)
    assert torch.allclose(ctx.eps_scale, scale.float()[y])
    assert out.objective.requires_grad


def test_warmup_covering_the_run_warns(tmp_path: Path, synthetic_npz: Path) -> None:
    logs: list[str] = []
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "method": "done", "epochs": 1,
                           "batch_size": 64}, ["attack.steps=1", "eval.n=20", "eval.checks=false"])
    train(cfg, tmp_path / "r", log=logs.append)
    assert any(line.startswith("warning: done.warmup=1 covers all 1 epochs") for line in logs)
    rec = json.loads((tmp_path / "r" / "log.jsonl").read_text().splitlines()[-1])
    assert rec["w_sum_mean"] == pytest.approx(1.0) and rec["reweighting"] is False


def test_validation_methods_need_a_validation_split_with_every_class(synthetic_npz: Path) -> None:
    from dorat.runs.run import prepare

    with pytest.raises(ConfigError, match="reads the validation split every epoch: set data.val_size"):
        prepare(C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "method": "wat"}))
    with pytest.raises(ConfigError, match=r"data.val_size=2 is smaller than the 4 classes"):
        prepare(C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "method": "done-val"},
                          ["data.val_size=2"]))


def test_a_preset_cannot_change_anything_but_the_method() -> None:
    C.register_preset("bad-preset", attack="pgd", loss="ce", weighting="uniform", set={"optim.lr": 0.5})
    try:
        with pytest.raises(ConfigError, match="sets optim.lr, outside its own parts"):
            C.resolve(None, {"method": "bad-preset"})
    finally:
        del C.PRESETS["bad-preset"]
    a, d = C.resolve(None, {"method": "at"}), C.resolve(None, {"method": "done"})
    assert dict(a.optim) == dict(d.optim)  # the optimizer is shared: grad_clip included


def test_compare_warns_when_methods_differ_outside_their_parts(tmp_path: Path) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text("base: fmnist-demo\nmethods: [at, {name: done-lr, method: done, set: {optim.lr: 0.01,"
                    " done.r: 2}}, {name: fat2, method: fat, set: {fat.tau: 2}}]\n")
    lines = comparability_warnings(load_grid(grid, tmp_path / "out"))
    assert [s for s in lines if "optim.lr" in s] == [
        "warning: the methods differ in optim.lr outside their own parts (0.05 in at, fat2; 0.01 in "
        "done-lr): the comparison is not about the method alone"]  # one line per key, all methods
    assert not any("done.r" in s or "fat.tau" in s for s in lines)  # their own parts


@pytest.mark.parametrize("method", ["frl-rwrm", "wat", "done-val", "trades-cfa", "dafa-at"])
def test_validation_driven_methods_train_log_and_resume_bitwise(tmp_path: Path, synthetic_npz: Path,
                                                               method: str) -> None:
    cfg = C.resolve(None, {"dataset": f"npz:{synthetic_npz}", "method": method, "epochs": 3,
                           "batch_size": 64},
                    ["attack.steps=2", "eval.n=40", "eval.checks=false", "data.val_size=80", "val.n=40",
                     "val.steps=2", "frl.warmup=1", "done.warmup=1", "optim.lr=0.02", "cfa.fawa_threshold=0",
                     "dafa.warmup=1"])
    full = train(cfg, tmp_path / "a", log=lambda s: None)
    assert train(cfg, tmp_path / "b", stop_after_epoch=2, log=lambda s: None) is None
    resumed = train(cfg, tmp_path / "b", resume=True, log=lambda s: None)
    assert full["ra"] == resumed["ra"] and full["sa"] == resumed["sa"]
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    if method != "dafa-at":  # the validation cost, every epoch it ran (DAFA reads none)
        assert all("val_seconds" in rec for rec in log[1:])
    # the probes these methods take at an epoch's start or end are the validation cost, not
    # training time: the training seconds leave them out, and never fall below zero for it
    assert all(rec["seconds"] > 0 and rec["cpu_seconds"] > 0 for rec in log)
    from dorat.report import write_report

    assert (Path(write_report([tmp_path / "a"], tmp_path / "rep")).parent / "class_params.png").is_file()
    key = {"frl-rwrm": "class_eps_scale", "wat": "class_w", "done-val": "class_loss",
           "trades-cfa": "class_eps_scale", "dafa-at": "class_w"}[method]
    assert len(log[-1][key]) == 4


@pytest.mark.parametrize("sets,fragment", [
    (["method=trades-cfa", "cfa.lambda_margin=-0.5"], "cfa.lambda_margin' must be >= 0"),
    (["method=frl-rm", "frl.max_margin=0.5"], "frl.max_margin' must be >= 1"),
    (["method=dafa", "dafa.lam=-1"], "dafa.lam' must be >= 0"),
    (["method=wat", "wat.eta=0"], "wat.eta' must be > 0"),
])
def test_negative_margin_or_beta_schedules_are_refused_before_training(
        tmp_path: Path, sets: list[str], fragment: str) -> None:
    from dorat.cli import main

    assert main(["train", "--out", str(tmp_path / "r"), *[a for s in sets for a in ("--set", s)]]) == 2
    assert not (tmp_path / "r").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match=fragment):
        C.resolve(None, sets=sets)
