"""Model registry. Inputs are images in [0, 1]; channels, size and classes come from the data."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from dorat.errors import ConfigError
from dorat.models.nets import PreActResNet18, ResNet18, SmallCNN, WideResNet

MODELS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "small-cnn": lambda c, size, k: SmallCNN(c, size, k),
    "resnet18": lambda c, size, k: ResNet18(c, k),
    "preact-resnet18": lambda c, size, k: PreActResNet18(c, k),
    "wrn-34-10": lambda c, size, k: WideResNet(34, 10, c, k),
}


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'; choose one of {', '.join(MODELS)}")
    return MODELS[name](in_channels, image_size, num_classes)


def model_names() -> list[str]:
    return list(MODELS)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


__all__ = ["MODELS", "build_model", "model_names", "has_batchnorm"]
