"""Training/validation/test splits and device-side batching with seeded augmentation.

The whole split lives on the training device as uint8; a batch is an index gather, a cast and
(optionally) a random crop + flip done with tensor ops on the device. The order of epoch e is a
pure function of (seed, e), so a run resumed at any epoch sees exactly the same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dorat.errors import ConfigError


def check_images(x: torch.Tensor, what: str = "images") -> None:
    """dorat's images are uint8 pixels (0..255) or floats in [0, 1]; anything else is an error
    (a normalised or 0..255 float tensor would otherwise be evaluated silently wrong)."""
    if x.dtype == torch.uint8:
        return
    if x.is_floating_point():
        if x.numel():
            if not bool(torch.isfinite(x).all()):
                raise ConfigError(f"{what} hold NaN or infinite pixels; give uint8 pixels (0..255) "
                                  "or finite floats in [0, 1]")
            lo, hi = float(x.min()), float(x.max())
            if lo < 0 or hi > 1:
                raise ConfigError(
                    f"{what} are floats in [{lo:.3g}, {hi:.3g}], outside [0, 1]; give uint8 pixels "
                    "(0..255) or floats in [0, 1] (divide 0..255 floats by 255; undo a mean/std "
                    "normalisation and put it inside the model)")
        return
    raise ConfigError(f"{what} have dtype {x.dtype}; give uint8 pixels (0..255) or floats in [0, 1]")


def as_examples(x: object, y: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N×C×H×W, labels int64 N) from tensors or arrays given to the Python API, checked
    as the npz reader checks a file: N×H×W is one channel, N×H×W×C is named (it must be
    permuted), pixels as check_images, one integer label 0.. per image, at least one image."""
    import numpy as np

    x, y = (v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for v in (x, y))
    if x.dim() == 3:
        x = x[:, None]
    if x.dim() == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        raise ConfigError(f"{what}: images of shape {tuple(x.shape)} look channels-last "
                          "(N×H×W×C); give N×C×H×W (x.permute(0, 3, 1, 2))")
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
        raise ConfigError(f"{what}: images must be N×C×H×W (or N×H×W) with one label each; got "
                          f"{tuple(x.shape)} and {tuple(y.shape)} labels")
    if len(x) == 0:
        raise ConfigError(f"{what} holds no examples")
    check_images(x, what)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool or int(y.min()) < 0:
        raise ConfigError(f"{what}: labels must be integers 0..C-1 (got {y.dtype}, "
                          f"min {y.min().item()})")
    return x.detach().cpu().contiguous(), y.detach().cpu().long()


def as_unit_images(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] from uint8 pixels or float images (checked by check_images)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


@dataclass
class Split:
    x: torch.Tensor  # uint8 (or float in [0, 1]) N×C×H×W
    y: torch.Tensor  # int64 N

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.y.cpu(), minlength=num_classes).tolist()


def _gen(seed: int, *salt: int) -> torch.Generator:
    g = torch.Generator()
    s = seed
    for v in salt:
        s = (s * 1_000_003 + v + 1) % (2**63 - 1)
    g.manual_seed(s)
    return g


def stratified_indices(y: torch.Tensor, per_class: list[int], seed: int, salt: int) -> torch.Tensor:
    """Seeded choice of ``per_class[c]`` examples of each class c (sorted indices)."""
    perm = torch.randperm(len(y), generator=_gen(seed, salt))
    ys = y[perm]
    chosen = []
    for c, k in enumerate(per_class):
        idx = perm[ys == c]
        if k > len(idx):
            raise ConfigError(f"class {c} has {len(idx)} examples, {k} requested")
        chosen.append(idx[:k])
    return torch.cat(chosen).sort().values


def balanced_counts(y: torch.Tensor, n: int, num_classes: int, what: str = "") -> list[int]:
    """Split n examples over classes as evenly as availability allows. Fewer than one per class
    present is an error (``what`` names the setting): a stratified subset must not silently
    drop classes."""
    avail = torch.bincount(y, minlength=num_classes).tolist()
    present = sum(a > 0 for a in avail)
    if n < present:
        raise ConfigError(f"{what or 'a stratified subset'}={n} is smaller than the {present} "
                          f"classes; a stratified subset needs at least one example per class, so "
                          f"use at least {present}")
    counts = [0] * num_classes
    remaining = min(n, sum(avail))
    while remaining > 0:
        open_ = [c for c in range(num_classes) if counts[c] < avail[c]]
        share = max(1, remaining // len(open_))
        for c in open_:
            add = min(share, avail[c] - counts[c], remaining)
            counts[c] += add
            remaining -= add
            if remaining == 0:
                break
    return counts


def longtail_counts(n_max: int, num_classes: int, ratio: float) -> list[int]:
    """Exponential profile: n_c = n_max · ρ^(−c/(C−1)); class 0 is the head, C−1 the tail."""
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * ratio ** (-c / (num_classes - 1)))) for c in range(num_classes)]


def make_splits(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    seed: int,
    val_size: int = 0,
    train_subset: int | None = None,
    imbalance_ratio: float = 1.0,
) -> tuple[Split, Split | None]:
    """Validation split first (stratified, from the full train set), then subset, then long tail."""
    idx = torch.arange(len(y))
    val = None
    if val_size:
        if val_size >= len(y):
            raise ConfigError(f"data.val_size={val_size} leaves no training data (train has {len(y)})")
        vidx = stratified_indices(y, balanced_counts(y, val_size, num_classes, "data.val_size"),
                                  seed, salt=1)
        mask = torch.ones(len(y), dtype=torch.bool)
        mask[vidx] = False
        val = Split(x[vidx], y[vidx])
        idx = idx[mask]
    if train_subset is not None and train_subset < len(idx):
        counts = balanced_counts(y[idx], train_subset, num_classes, "data.train_subset")
        sub = stratified_indices(y[idx], counts, seed, 2)
        idx = idx[sub]
    if imbalance_ratio > 1:
        avail = torch.bincount(y[idx], minlength=num_classes)
        counts = longtail_counts(int(avail.min()), num_classes, imbalance_ratio)
        idx = idx[stratified_indices(y[idx], counts, seed, salt=3)]
    return Split(x[idx], y[idx]), val


def resolve_augment(setting: str, dataset_default: str) -> str:
    return dataset_default if setting == "auto" else setting


class Batches:
    """Iterates a split in mini-batches on its device: float images in [0, 1] and labels."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        augment: str = "none",
        pad: int = 4,
        drop_last: bool = False,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.split = split
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.pad = pad
        self.drop_last = drop_last
        self.rank, self.world = shard

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches of the epoch, from batch ``start`` on."""
        for x, y, _ in self.indexed(epoch, start):
            yield x, y

    def indexed(self, epoch: int, start: int = 0
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(x, y, idx) batches; idx are the examples' positions in the split."""
        n = len(self.split)
        device = self.split.x.device
        order = torch.randperm(n, generator=_gen(self.seed, 10, epoch)) if self.shuffle else None
        g_aug = _gen(self.seed, 11, epoch)
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min(n, (b + 1) * self.batch_size)
            # Augmentation noise is drawn for every batch (also skipped ones) so that
            # starting at batch `start` gives the same stream as running from 0.
            sel = torch.arange(lo, hi) if order is None else order[lo:hi]
            aug = self._draw(hi - lo, g_aug)
            if b < start:
                continue
            if self.world > 1:  # each rank takes its slice of the global batch
                k = math.ceil(len(sel) / self.world)
                part = slice(self.rank * k, (self.rank + 1) * k)
                sel = sel[part]
                aug = tuple(a[part] for a in aug) if aug else aug
            sel = sel.to(device)
            x = as_unit_images(self.split.x[sel])
            if aug:
                x = self._apply(x, *(a.to(device) for a in aug))
            yield x, self.split.y[sel], sel

    def _draw(self, m: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        if self.augment == "none":
            return ()
        shifts = torch.randint(0, 2 * self.pad + 1, (2, m), generator=g)
        flips = torch.rand(m, generator=g) < 0.5
        return shifts[0], shifts[1], flips

    def _apply(
        self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor
    ) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        ch = torch.arange(c, device=x.device)[None, :, None, None]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        out = padded[batch, ch, rows, cols]
        if self.augment == "crop-flip":
            out = torch.where(flip[:, None, None, None], out.flip(3), out)
        return out
