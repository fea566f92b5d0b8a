"""Sanity checks that flag a broken robustness evaluation (METHODS.md §3).

A robust accuracy is an upper bound found by an attack; it is only credible if the attack was
able to do its job. Each check here is a property every sound evaluation has; when one fails
it says what the failure usually means:

* ``worst_case``      the worst case over attacks is no better than any single attack or SA
                      (by construction: a failure is a bug in the evaluator);
* ``aa_vs_pgd``       RA-AA ≤ RA-PGD: AutoAttack is the stronger evaluation, so if it finds
                      fewer adversarial examples than PGD-20, AutoAttack was misconfigured;
* ``gradient_masking`` RA-PGD − RA-AA ≤ 5 points: a larger gap means gradient-based PGD was
                      fooled (masked or obfuscated gradients) and RA-PGD overstates robustness;
* ``eps_zero``        at ε = 0 robust accuracy equals SA (else the model is stochastic or the
                      attack moves points it should not);
* ``eps_monotone``    robust accuracy does not rise as ε grows (on a short ε sweep);
* ``large_eps``       at a very large ε (0.5 in ℓ∞ on [0, 1] images) robust accuracy is near 0
                      (else the attack cannot find adversarial examples that certainly exist).

The ε sweep runs PGD (the evaluator's steps, step ε/4) on a small stratified subset.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

GAP_POINTS = 5.0  # RA-PGD − RA-AA above this flags gradient masking
MONOTONE_TOL = 0.02  # allowed rise of RA between consecutive ε of the sweep (attack noise)


def _check(name: str, ok: bool, detail: str, suggests: str) -> dict[str, Any]:
    return {"name": name, "ok": bool(ok), "detail": detail, **({} if ok else {"suggests": suggests})}


def table_checks(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Checks on the evaluation's own table (no extra attacks)."""
    out = []
    ra, sa = metrics["ra"], metrics["sa"]
    if "worst" in ra:
        singles = {k: v for k, v in ra.items() if k != "worst"}
        bad = [k for k, v in singles.items() if ra["worst"] > v + 1e-12] + (
            ["clean"] if ra["worst"] > sa + 1e-12 else [])
        out.append(_check(
            "worst_case", not bad,
            f"RA-worst {100 * ra['worst']:.2f}% ≤ SA and every single attack"
            if not bad else f"RA-worst {100 * ra['worst']:.2f}% exceeds {', '.join(bad)}",
            "a bug in the evaluator: the worst case must be the AND of the per-attack tables"))
    if "aa" in ra and "pgd" in ra:
        aa, pg = 100 * ra["aa"], 100 * ra["pgd"]
        n = max(metrics["n"], 1)
        tol = 100 * 1.0 / n + 0.5  # AutoAttack is not a superset of PGD: allow a hair of noise
        out.append(_check(
            "aa_vs_pgd", aa <= pg + tol, f"RA-AA {aa:.2f}% vs RA-PGD {pg:.2f}%",
            "AutoAttack found fewer adversarial examples than PGD-20: it was probably run with the "
            "wrong eps or norm, on normalised inputs, or on a model in train mode (a bug)"))
        out.append(_check(
            "gradient_masking", pg - aa <= GAP_POINTS,
            f"RA-PGD − RA-AA = {pg - aa:.2f} points (threshold {GAP_POINTS:g})",
            "likely gradient masking: PGD is fooled by masked or obfuscated gradients and RA-PGD "
            "overstates robustness; report RA-AA (or the worst case) and look for "
            "non-differentiable or saturating parts in the model"))
    return out


def large_eps(norm: str, shape: Sequence[int]) -> float:
    """A radius at which every [0, 1] image can reach the all-0.5 image."""
    d = math.prod(shape)
    return 0.5 if norm == "linf" else 0.5 * math.sqrt(d)


def sweep_grid(eps: float, norm: str, shape: Sequence[int]) -> list[float]:
    """The radii of the ε sweep: 0, ε/4, ε/2, ε, 2ε and a radius where every image breaks."""
    big = large_eps(norm, shape)
    return sorted({0.0, eps / 4, eps / 2, eps, min(2 * eps, big), big})


def eps_sweep_checks(sweep: dict[str, Any], changed: int, num_classes: int) -> list[dict[str, Any]]:
    """Checks eps_zero, eps_monotone and large_eps on an ε sweep (dorat.evaluation.evaluate.eps_sweep):
    ``sweep`` = {"eps", "ra_pgd", "sa", "n"}; ``changed``: examples whose prediction at ε = 0
    differs from the clean pass."""
    grid, ras, sa, n = sweep["eps"], sweep["ra_pgd"], sweep["sa"], sweep["n"]
    big = grid[-1]
    fmt = ", ".join(f"{e:.3g}: {100 * r:.1f}%" for e, r in zip(grid, ras))
    checks = [_check(
        "eps_zero", changed == 0,
        f"RA at ε=0 {100 * ras[0]:.2f}% vs SA {100 * sa:.2f}%; {changed} of {n} examples differ",
        "predictions change without any perturbation: the model is stochastic (dropout, "
        "BatchNorm in train mode, random defences) or the attack moves points at ε=0 (a bug)")]
    rises = [(grid[i], grid[i + 1]) for i in range(len(grid) - 1) if ras[i + 1] > ras[i] + MONOTONE_TOL]
    checks.append(_check(
        "eps_monotone", not rises, f"RA-PGD by ε on {n} points: {fmt}",
        "robust accuracy rises with ε" + "".join(f" (from ε={a:.3g} to ε={b:.3g})" for a, b in rises)
        + ": the attack misses adversarial examples that exist at the smaller radius (gradient "
        "masking or obfuscation) or there is an attack bug"))
    limit = max(0.05, 0.5 / num_classes)
    checks.append(_check(
        "large_eps", ras[-1] <= limit, f"RA-PGD at ε={big:.3g} is {100 * ras[-1]:.2f}% "
        f"(should be ≤ {100 * limit:.0f}%)",
        f"PGD cannot break the model even at ε={big:.3g}, where every image can be moved to a "
        "grey image: gradient masking (non-differentiable or saturating parts) or inputs not "
        "in [0, 1]"))
    return checks


def failed(checks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in checks if not c["ok"]]


def warning_lines(checks: Sequence[dict[str, Any]]) -> list[str]:
    return [f"warning: check {c['name']} failed: {c['detail']}; suggests {c['suggests']}"
            for c in failed(checks)]
