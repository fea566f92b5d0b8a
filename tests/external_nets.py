"""Models a user might bring to `dorat eval --model` (tests/test_card.py, tests/test_hostile.py):
plain nn.Modules from factories that know nothing about dorat."""

import torch
import torch.nn as nn

MEAN, STD = 0.3, 0.2


def make_linear() -> nn.Module:
    """28×28 grey images → 4 classes (the synthetic task of conftest.make_synthetic_npz)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 4))


class SelfNormalizing(nn.Module):
    """The same linear model, normalising its input itself (as many published models do)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - MEAN) / STD)


def make_cifar_shaped() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))


def not_a_module() -> str:
    return "a string"


def broken() -> nn.Module:
    raise RuntimeError("checkpoint server unreachable")


NOT_CALLABLE = 3


class NaNLogits(nn.Module):
    """A model whose logits are NaN (a diverged checkpoint): a card must refuse it, not report
    its argmax as a 25% clean accuracy."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 4), float("nan"))


def make_wide() -> nn.Module:
    """20 logits for the 4-class task."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 20))
