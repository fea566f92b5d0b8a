"""Readers for the standard dataset file formats.

Each reader returns numpy arrays: images as uint8 N×C×H×W, labels as int64 N. Every problem
with a file (missing, truncated, corrupted header, wrong shape) raises one ``DataError`` that
names the file and the fix.
"""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

from dorat.errors import DataError

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _refetch_hint(path: Path) -> str:
    return f"delete {path} and fetch it again (`dorat data fetch NAME`, or reinstall the package)"


def read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping ``.gz``; corrupt or truncated gzip is a DataError."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if path.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error):
            raise DataError(
                f"{path} is not a complete gzip file (truncated or corrupted); {_refetch_hint(path)}"
            ) from None
    return raw


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file (MNIST format): 2 zero bytes, dtype code, ndim, big-endian int32 dims."""
    data = read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path} has no valid IDX header (corrupted file); {_refetch_hint(path)}")
    if data[3] != ndim:
        raise DataError(
            f"{path} holds a {data[3]}-dimensional IDX array where {ndim} dimensions are expected "
            "(images and labels swapped, or a corrupted header)"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated inside its IDX header; {_refetch_hint(path)}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path} has {len(data)} bytes but its IDX header {dims} needs {expected} "
            f"(truncated or corrupted); {_refetch_hint(path)}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def read_idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, 3)
    y = read_idx(labels, 1)
    if x.dtype != np.uint8:
        raise DataError(f"{images} holds {x.dtype} pixels; uint8 images are expected")
    if len(x) != len(y):
        raise DataError(f"{images} has {len(x)} images but {labels} has {len(y)} labels")
    return x[:, None, :, :].copy(), y.astype(np.int64)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python batches (dicts, lists, bytes, numpy arrays) and nothing else.

    Any other global (a function, a class) is refused, so a crafted file cannot run code.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def read_pickle_dict(path: Path) -> dict:
    raw = read_bytes(path)
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataError(f"{path} is not a valid CIFAR python batch ({e}); {_refetch_hint(path)}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python batch (a dict is expected)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(values) -> list[str]:  # noqa: ANN001
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    d = read_pickle_dict(path)
    if "data" not in d or label_key not in d:
        raise DataError(f"{path} lacks the 'data' or '{label_key}' entry of a CIFAR batch")
    x = np.asarray(d["data"])
    y = np.asarray(d[label_key], dtype=np.int64)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
        raise DataError(f"{path}: CIFAR data must be uint8 N×3072 with N labels, got {x.shape}")
    return x.reshape(-1, 3, 32, 32), y


def read_cifar10(root: Path) -> tuple[np.ndarray, ...]:
    xs, ys = zip(*(read_cifar_batch(root / f"data_batch_{i}", "labels") for i in range(1, 6)))
    x_test, y_test = read_cifar_batch(root / "test_batch", "labels")
    meta = read_pickle_dict(root / "batches.meta")
    return np.concatenate(xs), np.concatenate(ys), x_test, y_test, _names(meta["label_names"])


def read_cifar100(root: Path) -> tuple[np.ndarray, ...]:
    x, y = read_cifar_batch(root / "train", "fine_labels")
    x_test, y_test = read_cifar_batch(root / "test", "fine_labels")
    meta = read_pickle_dict(root / "meta")
    return x, y, x_test, y_test, _names(meta["fine_label_names"])


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"{path} is not a readable SVHN .mat file ({e}); {_refetch_hint(path)}") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"{path}: SVHN needs X of shape 32×32×3×N and y; got another layout")
    y = y.reshape(-1).astype(np.int64)
    y[y == 10] = 0  # SVHN stores the digit 0 as label 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), y


def read_stl10_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    xb = read_bytes(root / f"{split}_X.bin")
    yb = read_bytes(root / f"{split}_y.bin")
    size = 3 * 96 * 96
    if len(xb) % size or len(xb) // size != len(yb):
        raise DataError(
            f"{root}/{split}_X.bin has {len(xb)} bytes for {len(yb)} labels; "
            f"each image takes {size} bytes (truncated?); {_refetch_hint(root)}"
        )
    # Images are stored column-major (Matlab order): N×C×W×H.
    x = np.frombuffer(xb, np.uint8).reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
    y = np.frombuffer(yb, np.uint8).astype(np.int64) - 1
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{root}/{split}_y.bin holds labels outside 1..10")
    return np.ascontiguousarray(x), y


def read_stl10(root: Path) -> tuple[np.ndarray, ...]:
    x, y = read_stl10_split(root, "train")
    xt, yt = read_stl10_split(root, "test")
    names_file = root / "class_names.txt"
    names = names_file.read_text().split() if names_file.exists() else [str(i) for i in range(10)]
    return x, y, xt, yt, names


def _read_image(path: Path, size: int, box: tuple[int, int, int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if box is not None:
                im = im.crop(box)
            im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read image {path} ({e}); {_refetch_hint(path)}") from None


def _read_gtsrb_csv(csv_path: Path, image_dir: Path, size: int) -> tuple[list, list]:
    xs, ys = [], []
    try:
        rows = list(csv.DictReader(csv_path.read_text().splitlines(), delimiter=";"))
    except OSError as e:
        raise DataError(f"cannot read {csv_path}: {e.strerror}") from None
    for row in rows:
        try:
            box = tuple(int(row[k]) for k in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
            label = int(row["ClassId"])
            name = row["Filename"]
        except (KeyError, ValueError, TypeError):
            raise DataError(f"{csv_path} is not a GTSRB annotation file (bad row {row})") from None
        xs.append(_read_image(image_dir / name, size, box))  # type: ignore[arg-type]
        ys.append(label)
    return xs, ys


def read_gtsrb(root: Path, size: int = 32) -> tuple[np.ndarray, ...]:
    """GTSRB: per-class folders with GT-*.csv under Final_Training/Images, test CSV with labels.

    Each sign is cropped to its annotated region of interest and resized to size×size.
    """
    train_root = root / "GTSRB" / "Final_Training" / "Images"
    xs, ys = [], []
    for class_dir in sorted(p for p in train_root.iterdir() if p.is_dir()):
        csvs = sorted(class_dir.glob("GT-*.csv"))
        if not csvs:
            raise DataError(f"{class_dir} has no GT-*.csv annotation file")
        x, y = _read_gtsrb_csv(csvs[0], class_dir, size)
        xs += x
        ys += y
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    xt, yt = _read_gtsrb_csv(root / "GT-final_test.csv", test_dir, size)
    if not xs or not xt:
        raise DataError(f"{root}: GTSRB has no training or no test images")
    n_classes = max(max(ys), max(yt)) + 1
    return (np.stack(xs), np.asarray(ys, np.int64), np.stack(xt), np.asarray(yt, np.int64),
            [str(i) for i in range(max(43, n_classes))])


def read_npz(path: Path) -> tuple[np.ndarray, ...]:
    """A user's own data: x_train, y_train, x_test, y_test (uint8 N×H×W or N×H×W×C), classes?"""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise DataError(f"npz file {path} does not exist") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        why = "not an .npz archive" if "pickled" in str(e) else (str(e) or type(e).__name__)
        raise DataError(f"{path} is not a readable .npz file ({why}); write it again with "
                        "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(
            f"{path} lacks arrays {', '.join(missing)}; save with "
            "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
        )
    out = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if np.issubdtype(x.dtype, np.floating) and x.dtype != np.float16:
            if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
                raise DataError(f"{path}: x_{split} holds floats outside [0, 1]; float images must "
                                "be in [0, 1] (or store uint8 pixels 0..255)")
            x = x.astype(np.float32)
        elif x.dtype != np.uint8:
            raise DataError(
                f"{path}: x_{split} has dtype {x.dtype}; uint8 pixels in 0..255 (or float32 in "
                "[0, 1]) are expected (convert with (x * 255).round().astype(np.uint8))"
            )
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[3] not in (1, 3):
            raise DataError(f"{path}: x_{split} of shape {x.shape} looks channels-first (N×C×H×W); "
                            "npz images are N×H×W or N×H×W×C: save x.transpose(0, 2, 3, 1)")
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)
        else:
            raise DataError(f"{path}: x_{split} must be N×H×W or N×H×W×C, got shape {x.shape}")
        if x.dtype == np.uint8 and x.size and x.max() == 1:
            raise DataError(f"{path}: x_{split} holds uint8 pixels of only 0 and 1; uint8 pixels "
                            "are 0..255 (store x * 255, or float32 images in [0, 1])")
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{path}: y_{split} must be a 1-D integer array with one label per image "
                f"(got {y.dtype} of shape {y.shape} for {len(x)} images)"
            )
        if len(y) and np.issubdtype(y.dtype, np.unsignedinteger) and y.max() > np.iinfo(np.int64).max:
            raise DataError(f"{path}: y_{split} has labels up to {y.max()}; labels must be 0..C-1")
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: y_{split} has negative labels (min {y.min()}); labels must be "
                            "0..C-1")
        out += [np.ascontiguousarray(x), y.astype(np.int64)]
    if out[0].shape[1:] != out[2].shape[1:]:
        raise DataError(f"{path}: train images {out[0].shape[1:]} and test {out[2].shape[1:]} differ")
    n_classes = check_labels(str(path), out[1], out[3])
    names = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    if names is not None and len(names) != n_classes:
        raise DataError(f"{path}: 'classes' names {len(names)} classes but the labels are "
                        f"0..{n_classes - 1}; give one name per class")
    out.append(names or [str(i) for i in range(n_classes)])
    return tuple(out)


def check_labels(where: str, y_train: np.ndarray, y_test: np.ndarray,
                 num_classes: int | None = None) -> int:
    """The number of classes K of integer labels, checked: at least two classes have training
    examples and every label is in 0..K-1. K is ``num_classes`` for a data set with named
    classes; else K-1 is the largest training label and every class 0..K-1 must have training
    examples (a test label outside them would otherwise build a bigger model). Nothing of size K
    is built before K is checked, so a stray label of 10^12 is an error, not a memory blow-up."""
    if len(y_train) == 0:
        raise DataError(f"{where}: the training split is empty")
    present = np.unique(y_train)
    if len(present) < 2:
        raise DataError(f"{where}: every training label is {present[0]}; a classifier needs at "
                        "least two classes")
    k = int(present[-1]) + 1 if num_classes is None else num_classes
    for split, y in (("training", present), ("test", y_test)):
        if len(y) and (y.min() < 0 or y.max() >= k):
            bad = np.unique(y[(y < 0) | (y >= k)])[:5]
            raise DataError(f"{where}: {split} labels {', '.join(map(str, bad))} are outside the "
                            f"{k} classes 0..{k - 1}"
                            + (" of the training split" if num_classes is None else " it names"))
    if num_classes is None and len(present) != k:
        gaps = ", ".join(map(str, np.setdiff1d(np.arange(min(k, len(present) + 3)), present)[:3]))
        more = ", ..." if k - len(present) > 3 else ""
        raise DataError(f"{where}: labels go up to {k - 1} but only {len(present)} classes have "
                        f"training examples (none for {gaps}{more}); labels "
                        "must be 0..K-1 with every class in the training split: remap them")
    return k
