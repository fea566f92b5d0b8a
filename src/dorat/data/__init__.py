"""Datasets in memory: uint8 image tensors (N×C×H×W), int64 labels and class names.

``load_dataset("fashion-mnist")`` finds the files (``--data-dir``, ``$DORAT_DATA``,
``~/.cache/dorat``, Debian's ``/usr/share/datasets``), else downloads them with a checksum.
``load_dataset("npz:PATH")`` reads a user's own arrays, ``load_dataset("imagefolder:DIR")`` a
folder of images per class (dorat.data.imagefolder).

Imports: files, errors; nothing of models, configs or runs (tests/test_layers.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dorat.data.fetch import download, find_or_fetch, get_spec, locate
from dorat.data.imagefolder import folder_of, is_imagefolder, read_imagefolder
from dorat.data.registry import SPECS
from dorat.errors import DataError

__all__ = ["Dataset", "check_dataset", "load_dataset", "dataset_names", "locate", "download", "SPECS"]


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor  # uint8 (or float in [0, 1]) N×C×H×W
    y_train: torch.Tensor  # int64 N
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    augment: str = "none"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]


def dataset_names() -> list[str]:
    return list(SPECS) + ["npz:PATH", "imagefolder:DIR"]


def check_dataset(ds: Dataset) -> None:
    """At least two classes with training examples, every label one of the data set's classes,
    and train and test images of one shape (user files are checked further by their reader)."""
    from dorat.data.readers import check_labels

    where = f"dataset '{ds.name}'"
    if len(ds.x_test) == 0:
        raise DataError(f"{where} has an empty test split; it needs at least one example")
    check_labels(where, ds.y_train.numpy(), ds.y_test.numpy(), ds.num_classes)
    if tuple(ds.x_train.shape[1:]) != tuple(ds.x_test.shape[1:]):
        raise DataError(f"{where}: train images {tuple(ds.x_train.shape[1:])} and test images "
                        f"{tuple(ds.x_test.shape[1:])} differ in shape")


def load_dataset(name: str, data_dir: str | None = None, allow_download: bool = True) -> Dataset:
    """Load a dataset by name into CPU memory (uint8), validating shapes and labels."""
    if name.startswith("npz:"):
        from dorat.data.readers import read_npz

        x, y, xt, yt, classes = read_npz(Path(name[4:]).expanduser())
        augment = "none"
    elif is_imagefolder(name):
        x, y, xt, yt, classes = read_imagefolder(folder_of(name), data_dir)
        augment = "crop-flip"  # natural images, the common use; data.augment sets another
    else:
        spec = get_spec(name)
        root = find_or_fetch(name, data_dir, allow_download)
        x, y, xt, yt, classes = spec.read(root)
        augment = spec.augment
    ds = Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x)),
        y_train=torch.from_numpy(y.astype(np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(xt)),
        y_test=torch.from_numpy(yt.astype(np.int64)),
        classes=list(classes),
        augment=augment,
    )
    check_dataset(ds)
    return ds


def describe(name: str, data_dir: str | None = None) -> str:
    """`dorat data check imagefolder:DIR`: the data set (decoded and cached) in one line."""
    from dorat.data.imagefolder import arrays_sha256

    ds = load_dataset(name, data_dir)
    digest = arrays_sha256(*(t.numpy() for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test)))
    return (f"{name}: {len(ds.y_train)} train, {len(ds.y_test)} test, {ds.num_classes} classes "
            f"({', '.join(ds.classes)}), images {tuple(ds.shape)}, decoded arrays sha256 {digest}")
