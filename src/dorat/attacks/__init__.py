"""Attacks: batched PGD / FGSM-RS (ℓ∞, ℓ2; CE, margin, KL losses)."""

from dorat.attacks.pgd import AttackResult, attack_loss, fgsm, frozen, mode, pgd, project

__all__ = ["AttackResult", "attack_loss", "fgsm", "frozen", "mode", "pgd", "project"]
