"""Checkpoints without pickle: one safetensors file holds tensors, JSON metadata holds the rest.

A training state (model, optimizer, scheduler, method state such as DONE's log u_t, epoch) is a
nested structure of dicts, lists, numbers, strings and tensors. ``pack`` splits it into a flat
``{name: tensor}`` dict and a JSON skeleton with placeholders; both go into one safetensors file
written atomically (temporary file in the same directory, fsync, ``os.replace``), so a crash
mid-write leaves the previous checkpoint intact. Loading never unpickles anything.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import pickle
import struct
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dorat.errors import CheckpointError, DoratError

FORMAT = "dorat-checkpoint-1"
_UMASK = os.umask(0)
os.umask(_UMASK)


def pack(obj: Any, tensors: dict[str, torch.Tensor], path: str = "t") -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        for name, old in tensors.items():  # one tensor reached twice is stored once; safetensors
            if t.numel() and old.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                if old.data_ptr() == t.data_ptr() and old.shape == t.shape and old.dtype == t.dtype:
                    return {"__tensor__": name}
                t = t.clone()  # refuses tensors that share memory: a view of another one is copied
                break
        tensors[path] = t
        return {"__tensor__": path}
    if isinstance(obj, dict):
        return {"__dict__": [[pack(k, tensors, f"{path}.k{i}"), pack(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [pack(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        if isinstance(obj, float) and obj != obj:
            return {"__float__": "nan"}
        if isinstance(obj, float) and obj in (float("inf"), float("-inf")):
            return {"__float__": "inf" if obj > 0 else "-inf"}
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def tensors_to(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested in dicts, lists, tuples) detached and on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: tensors_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors_to(v, device) for v in obj)
    return obj


def storable(obj: Any) -> bool:
    """Whether ``pack`` can store ``obj`` (tensors, numbers, strings, None and containers of them)."""
    try:
        pack(obj, {})
    except TypeError:
        return False
    return True


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        raise ValueError("unknown node in checkpoint skeleton")
    return obj


@contextlib.contextmanager
def atomic_path(path: Path):  # noqa: ANN201
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    tmp = ""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        # mkstemp makes 0600, and writers such as safetensors may recreate the file: give the
        # finished file the usual permissions
        os.chmod(tmp, 0o666 & ~_UMASK)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        raise_if_full(e, path)
        raise
    else:
        with contextlib.suppress(OSError):
            dfd = os.open(path.parent, os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def raise_if_full(e: BaseException, path: Path) -> None:
    """A write of ``path`` that failed for lack of space becomes one CheckpointError (safetensors
    reports the OS error only in its message)."""
    full = (e.errno in _FULL if isinstance(e, OSError)
            else any(f"os error {n})" in str(e) for n in _FULL))
    if full:
        raise CheckpointError(f"no space left on the device writing {path}; its previous version "
                              "is kept: free space (or move the run), then continue with --resume"
                              ) from None


def _canonical_header(path: Path) -> None:
    """Rewrite a safetensors header in place with its metadata keys sorted. safetensors keeps
    the metadata in a hash map whose order changes between processes, so two saves of the same
    tensors differed in bytes and a file hash could not tell whether a resume was exact. The
    header's length and the data offsets do not change (same JSON, other key order)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        if isinstance(header.get("__metadata__"), dict):
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= n:  # always equal in practice; padding is allowed by the format
            f.seek(8)
            f.write(text + b" " * (n - len(text)))


def probe_writable(path: Path) -> None:
    """Check now that ``path`` can be written (by creating and removing a temporary file beside
    it), so a long computation does not end in a failed write; a CheckpointError if not."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror}); choose a writable --out"
                              ) from None
    os.close(fd)
    os.unlink(tmp)


def check_output_file(out: Path, overwrite: bool) -> None:
    """``out`` can be written now (its directory exists; it is new, or ``overwrite``): a
    DoratError if not."""
    if not out.parent.is_dir():
        raise DoratError(f"cannot write {out}: directory {out.parent} does not exist")
    if out.exists() and not overwrite:
        raise DoratError(f"{out} already exists; pass --overwrite to replace it or --out FILE "
                         "to keep both")
    probe_writable(out)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def strict(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by None: strict JSON has no NaN, and a
    per-class accuracy of a class the evaluation set lacks is undefined (null), not a number."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def json_text(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Strict JSON (see `strict`), written atomically."""
    write_text_atomic(path, json_text(obj))


def read_json(path: Path) -> Any:
    """A JSON file written by `write_json_atomic`; a null in a list of numbers (an undefined
    per-class value) reads back as NaN, so arithmetic and min() treat it as before."""
    def numbers(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: numbers(v) for k, v in obj.items()}
        if isinstance(obj, list):
            if obj and all(v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in obj) and any(v is not None for v in obj):
                return [math.nan if v is None else v for v in obj]
            return [numbers(v) for v in obj]
        return obj

    return numbers(json.loads(Path(path).read_text()))


def save_state(path: Path, state: dict[str, Any], meta: dict[str, str] | None = None) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(state, tensors)
    metadata = {"format": FORMAT, "state": json.dumps(skeleton), **(meta or {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        _canonical_header(tmp)


def read_safetensors(path: Path, missing: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; any problem is one CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(missing)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); it may be "
            "truncated or not a dorat file: delete it to start over"
        ) from None
    return tensors, meta


def load_state(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    tensors, meta = read_safetensors(path, f"no checkpoint at {path}; train first or check the RUN_DIR")
    if meta.get("format") != FORMAT or "state" not in meta:
        raise CheckpointError(f"{path} is a safetensors file but not a dorat checkpoint")
    try:
        state = unpack(json.loads(meta["state"]), tensors)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path} has a damaged state skeleton ({e})") from None
    return state, meta


def save_weights(path: Path, model: torch.nn.Module, meta: dict[str, str] | None = None) -> None:
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=meta or {})
        _canonical_header(tmp)


def load_weights(path: Path, model: torch.nn.Module) -> dict[str, str]:
    """Load model weights from safetensors into ``model``; a mismatch is a CheckpointError."""
    sd, meta = read_safetensors(path, f"no model weights at {path}; train first (`dorat train --out ...`)")
    check_finite(sd, path)
    load_state_dict_checked(model, sd, str(path))
    return meta


def check_finite(sd: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinite weights: such a model evaluates to a plausible chance accuracy."""
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite weights ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); the model "
                              "is broken: train it again (lower optim.lr if it diverged)")


def load_state_dict_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], src: str,
                            hint: str = "it was trained with another model or dataset: use the "
                                        "RUN_DIR's own config") -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or shapes:
        detail = (f"missing {missing[:3]}" if missing else
                  f"unexpected {unexpected[:3]}" if unexpected else
                  f"shape of {shapes[0]} is {tuple(sd[shapes[0]].shape)}, "
                  f"model needs {tuple(own[shapes[0]].shape)}")
        raise CheckpointError(f"{src} does not fit this model ({detail}); {hint}")
    model.load_state_dict(sd)


# Weights a user names (dorat eval --model --weights, init): safetensors or a weights_only state dict
STATE_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")  # common checkpoint nests


def file_digest(path: Path, algorithm: str = "md5") -> str:
    """The hex digest of a file, read in 1 MiB blocks (hashlib.file_digest is Python ≥ 3.11)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256(path: Path) -> str:
    return file_digest(path, "sha256")


def read_torch_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``torch.save`` file, read with ``weights_only=True``: tensors and plain
    containers only, never code. A checkpoint that nests it (``{"state_dict": ...}``) and
    DataParallel's ``module.`` prefix are accepted."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} needs code to load (it pickles objects, not only tensors), which dorat never "
            "runs: save the weights with torch.save(model.state_dict(), f) or as safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch file ({str(e).splitlines()[0]})"
                              ) from None
    if isinstance(obj, Mapping) and not _is_state(obj):
        obj = next((obj[k] for k in STATE_KEYS if isinstance(obj.get(k), Mapping) and _is_state(obj[k])),
                   obj)
    if not isinstance(obj, Mapping) or not _is_state(obj):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors "
                              f"(nor one under {', '.join(STATE_KEYS)})")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_state(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_external_weights(path: str | Path, model: torch.nn.Module,
                          hint: str = "check that --model builds the architecture these weights "
                                      "are for") -> None:
    """Weights from safetensors (by its suffix) or a PyTorch state dict, checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        sd, _ = read_safetensors(path, f"no weights file at {path}")
    else:
        sd = read_torch_state(path)
    check_finite(sd, path)
    load_state_dict_checked(model, sd, str(path), hint=hint)
