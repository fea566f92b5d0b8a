"""Attacks: one iteration core (PGD, FGSM-RS, the barrier lower level) and AutoAttack.

Imports: errors only. The attacks see a model as a callable and know nothing of configs,
methods or runs (tests/test_layers.py).
"""

from dorat.attacks.core import AttackResult, attack_loss, frozen, iterate, kl_per_example, mode
from dorat.attacks.pgd import PGDSpec, fgsm, pgd, project

# The evaluator's attacks, named once: key -> (name in logs, column label in tables).
EVAL_ATTACKS = {"pgd": ("PGD", "PGD"), "cw": ("CW∞", "CW"), "aa": ("AutoAttack", "AA")}



def attack_names_problem(names: list[str] | tuple[str, ...]) -> str | None:
    """What is wrong with a list of evaluation attacks, or None."""
    bad = [a for a in names if a not in EVAL_ATTACKS]
    if bad:
        return f"unknown attack(s) {', '.join(map(str, bad))}; available: {', '.join(EVAL_ATTACKS)}"
    if not names:
        return f"name at least one attack ({', '.join(EVAL_ATTACKS)})"
    if len(set(names)) != len(names):
        return "names an attack twice"
    return None


__all__ = ["attack_names_problem", "AttackResult", "EVAL_ATTACKS", "PGDSpec", "attack_loss", "fgsm",
           "frozen", "iterate", "kl_per_example", "mode", "pgd", "project"]
