"""Model registry. Inputs are images in [0, 1]; channels, size and classes come from the data.

A model is a registered factory ``(in_channels, image_size, num_classes) -> nn.Module``
(``dorat.register("model", "my-net", factory)``, from a plug-in too), or an import path
``module:factory`` whose factory is called with no arguments.

``averaging``: the weight average (EMA) and BatchNorm-aware folds of weights. Imports: config
(the registry), files, errors (tests/test_layers.py).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dorat.config import parts
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


def import_factory(spec: str) -> Callable[[], Any]:
    """``MODULE:ATTR`` (ATTR may be dotted) -> the callable; the current directory is importable,
    as with ``python -m`` (a model in ./mynet.py reopens from where it was trained). Any failure,
    whatever the module's code raises on import, is one ConfigError."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ConfigError(f"model '{spec}' must be MODULE:FACTORY, e.g. my_pkg.nets:make_model "
                          "(a function or class that returns the nn.Module, called with no arguments)")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        obj: Any = importlib.import_module(mod_name)
    except BaseException as e:  # an import runs the module's code: anything may come out
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ConfigError(f"cannot import '{mod_name}' for model '{spec}' ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}); check the name and that it is "
                          "importable from here (PYTHONPATH)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"'{mod_name}' has no attribute '{attr}' (model '{spec}')")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"model '{spec}' is not callable: name a function or class that returns "
                          "the nn.Module")
    return obj


def build_external(spec: str) -> nn.Module:
    """Call the factory ``spec`` names; it must return an nn.Module."""
    factory = import_factory(spec)
    try:
        model = factory()
    except Exception as e:
        raise ConfigError(f"calling {spec}() failed ({type(e).__name__}: {e}); the factory must "
                          "build the model with no arguments") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    if ":" in name and name not in parts.REGISTRY["model"]:
        return build_external(name)
    return parts.get("model", name)(in_channels, image_size, num_classes)


def check_fits(model: nn.Module, x: torch.Tensor, num_classes: int, where: str) -> None:
    """One forward pass, in eval mode (no BatchNorm statistics move, no state changes), on two
    images ``x`` in [0, 1] on the model's device: the model takes them and returns finite logits
    of shape (2, num_classes). Run before anything is trained or written."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except Exception as e:
        raise ConfigError(f"the model does not take {where} ({tuple(x.shape[1:])}, in [0, 1]): "
                          f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}") from None
    finally:
        model.train(was_training)
    n = min(2, len(x))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"the model returns {shape} for {n} images; it must return logits of "
                          f"shape (N, {num_classes}) for the {num_classes} classes of {where}")
    if not bool(torch.isfinite(out).all()):
        raise ConfigError(f"the model returns NaN or infinite logits on {where}; "
                          "check its weights (a diverged or corrupted checkpoint?) and its forward")


def model_names() -> list[str]:
    return parts.names("model")


def use_channels_last(cfg: Any, device: torch.device) -> bool:
    """perf.channels_last: on, off, or auto = on for CPU and CUDA (all dorat models are convnets
    on 4-D images; on CPU oneDNN's convolutions and max-pooling are much faster in NHWC)."""
    setting = cfg.perf.channels_last
    return setting == "on" or (setting == "auto" and device.type in ("cpu", "cuda"))


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


__all__ = ["build_external", "build_model", "check_fits", "has_batchnorm", "import_factory", "model_names",
           "use_channels_last"]
