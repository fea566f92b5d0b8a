"""Model registry. Inputs are images in [0, 1]; channels, size and classes come from the data.

A model is a registered factory ``(in_channels, image_size, num_classes) -> nn.Module``
(``dorat.register("model", "my-net", factory)``, from a plug-in too), or an import path
``module:factory`` whose factory is called with no arguments."""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn as nn

from dorat import parts
from dorat.errors import ConfigError
from dorat.models.nets import VGG8, PreActResNet18, ResNet18, ResNet20, SmallCNN, WideResNet

parts.register("model", "small-cnn", lambda c, size, k: SmallCNN(c, size, k))
parts.register("model", "resnet18", lambda c, size, k: ResNet18(c, k))
parts.register("model", "preact-resnet18", lambda c, size, k: PreActResNet18(c, k))
parts.register("model", "wrn-34-10", lambda c, size, k: WideResNet(34, 10, c, k))
parts.register("model", "preact-resnet18-w16", lambda c, size, k: PreActResNet18(c, k, width=16))
parts.register("model", "resnet20", lambda c, size, k: ResNet20(c, k))
parts.register("model", "vgg8-w16", lambda c, size, k: VGG8(c, k, width=16))
parts.register("model", "vgg8-w32", lambda c, size, k: VGG8(c, k, width=32))


def import_factory(path: str) -> object:
    """``module:attr`` -> the attribute (a ConfigError names what is missing)."""
    module, _, attr = path.partition(":")
    try:
        obj: object = importlib.import_module(module)
        for a in attr.split("."):
            obj = getattr(obj, a)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model '{path}' cannot be imported ({e}); give module:factory of an "
                          "importable module (on PYTHONPATH)") from None
    return obj


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    if ":" in name and name not in parts.REGISTRY["model"]:
        model = import_factory(name)()  # type: ignore[operator]
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model '{name}' returned {type(model).__name__}, not an nn.Module")
        return model
    return parts.get("model", name)(in_channels, image_size, num_classes)


def model_names() -> list[str]:
    return parts.names("model")


def use_channels_last(cfg: Any, device: torch.device) -> bool:
    """perf.channels_last: on, off, or auto = on for CPU and CUDA (all dorat models are convnets
    on 4-D images; on CPU oneDNN's convolutions and max-pooling are much faster in NHWC)."""
    setting = cfg.perf.channels_last
    return setting == "on" or (setting == "auto" and device.type in ("cpu", "cuda"))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


__all__ = ["build_model", "import_factory", "model_names", "has_batchnorm", "use_channels_last"]
