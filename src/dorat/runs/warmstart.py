"""``init``: a run that starts from trained weights instead of a fresh initialisation
(`dorat train --init RUN_OR_WEIGHTS`, ``dorat.fit(..., init=...)``): fine-tuning, as FAAL and FRL
are used in their papers, or a second method on top of a trained PGD-AT model.

``init`` names a run directory (its model.safetensors: the final weights `dorat eval RUN`
evaluates; name RUN/best.safetensors for the best probed epoch's) or a weights file: safetensors,
or a PyTorch state dict read with ``weights_only=True`` (dorat.evaluation.card: nothing is unpickled). The
run records in RUN/init.json what it started from: the file and its sha256. Only a run's first
start loads it; a resume continues from the checkpoint, and a run restarted before its first
checkpoint refuses an init file whose sha256 changed since.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.nn as nn

from dorat.errors import CheckpointError, ConfigError
from dorat.files.checkpoint import load_external_weights, read_json, sha256

INIT_FILE = "init.json"


def weights_file(init: str) -> Path:
    """The weights file ``init`` names (a run directory: its model.safetensors)."""
    path = Path(init).expanduser()
    if path.is_dir():
        if (path / "model.safetensors").is_file():
            return path / "model.safetensors"
        raise ConfigError(f"init={init} is a directory without model.safetensors: name a finished "
                          "dorat run, or a weights file (e.g. RUN/best.safetensors)")
    if not path.is_file():
        raise ConfigError(f"init={init} does not exist: name a dorat run directory or a weights file "
                          "(.safetensors, or a torch.save'd state dict)")
    return path


def load_init(init: str, model: nn.Module, run_dir: Path, restart: bool) -> dict[str, Any]:
    """Load ``init``'s weights into ``model`` (a mismatch names the first tensor that differs);
    returns the record for RUN/init.json. ``restart``: the run in ``run_dir`` started before, so
    its recorded init must be the same file content."""
    path = weights_file(init)
    record = {"init": init, "file": str(path.resolve()), "sha256": sha256(path)}
    old = run_dir / INIT_FILE
    if restart and old.is_file():
        try:
            before = read_json(old).get("sha256")
        except (ValueError, AttributeError):
            before = None
        if before is not None and before != record["sha256"]:
            raise ConfigError(f"{path} changed since this run started from it (sha256 {before[:12]}… "
                              f"in {old}, now {record['sha256'][:12]}…); restore the file, or start a "
                              "new run (--overwrite)")
    try:
        load_external_weights(path, model, hint="init must hold weights of the model this run "
                                                "builds (its --model, dataset and classes)")
    except CheckpointError as e:
        raise ConfigError(f"init: {e}") from None
    return record
