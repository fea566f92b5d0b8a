"""The prepared run: everything the training loop needs, built and validated by
dorat.runs.run.prepare before anything is written, and what ``load_run`` gives back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from dorat.config import Config
from dorat.data import Dataset
from dorat.data.loader import Split
from dorat.objectives import Method


@dataclass
class Run:
    """Everything a training run needs, built and validated before anything is written."""

    cfg: Config
    data: Dataset
    train: Split
    val: Split | None
    model: nn.Module
    method: Method
    device: torch.device
