"""``imagefolder:DIR``: a data set laid out as DIR/train/CLASS/*.png|jpg|jpeg|bmp and
DIR/test/CLASS/... (the ImageFolder convention, read with Pillow, without torchvision).

Class names are the sorted folder names of DIR/train; DIR/test must have the same folders. The
images are decoded once into an uncompressed ``.npz`` cache (uint8 N×C×H×W) in dorat's data
directory (``--data-dir``, else ``$DORAT_DATA``, else ``~/.cache/dorat``), under
``imagefolder/<key>.npz`` where the key hashes the folder's resolved path and every image's
relative path, size and modification time: a later run loads the cache in seconds, and a changed,
added or removed image decodes the folder again. Every problem is one ``DataError`` before
anything is written: a missing split, an empty or one-split class folder, an unreadable or
truncated image (named), images of different sizes or modes in one data set (the first
differing file named), a folder without images.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from dorat.errors import DataError

PREFIX = "imagefolder:"
EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
MODES = {"L": 1, "RGB": 3}  # Pillow mode -> channels
CACHE_VERSION = 1
NOTICE_FROM = 1000  # images: a folder this large says that it is being decoded


def is_imagefolder(name: str) -> bool:
    return name.startswith(PREFIX)


def folder_of(name: str) -> Path:
    return Path(name[len(PREFIX):]).expanduser()


def _listing(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """The classes (sorted folder names of train/) and, per split, (file, label) in a fixed order."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; give imagefolder:DIR with DIR/train/"
                        "CLASS/*.png and DIR/test/CLASS/*.png")
    splits: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "test"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"image folder {root} has no {split}/ folder; lay it out as "
                            f"{root}/train/CLASS/*.png and {root}/test/CLASS/*.png")
        classes = {}
        for c in sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")):
            classes[c.name] = sorted(f for f in c.iterdir()
                                     if f.is_file() and f.suffix.lower() in EXTENSIONS)
        splits[split] = classes
    train, test = splits["train"], splits["test"]
    if not any(train.values()) and not any(test.values()):
        raise DataError(f"image folder {root} holds no images ({', '.join(EXTENSIONS)}) in "
                        "train/CLASS/ or test/CLASS/ folders")
    for split, mine, other in (("train", train, test), ("test", test, train)):
        only = sorted(set(mine) - set(other))
        if only:
            other_name = "test" if split == "train" else "train"
            raise DataError(f"image folder {root}: class folder {split}/{only[0]} has no "
                            f"{other_name}/{only[0]}; every class needs a folder in both splits")
        for c, files in mine.items():
            if not files:
                raise DataError(f"image folder {root}: class folder {split}/{c} has no images "
                                f"({', '.join(EXTENSIONS)}); remove it or add its images")
    if len(train) < 2:
        raise DataError(f"image folder {root} has {len(train)} class folder; a classifier needs "
                        "at least two")
    classes = sorted(train)
    index = {c: i for i, c in enumerate(classes)}
    return classes, {s: [(f, index[c]) for c in classes for f in splits[s][c]] for s in splits}


def cache_key(root: Path, files: dict[str, list[tuple[Path, int]]]) -> str:
    h = hashlib.sha256(f"dorat-imagefolder-v{CACHE_VERSION}\0{root.resolve()}\0".encode())
    for split in ("train", "test"):
        for f, label in files[split]:
            try:
                st = f.stat()
            except OSError as e:
                raise DataError(f"cannot read image {f} ({e.strerror})") from None
            h.update(f"{split}\0{f.relative_to(root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode())
    return h.hexdigest()[:32]


def cache_dir(data_dir: str | None) -> Path:
    if data_dir:
        base = Path(data_dir)
    elif os.environ.get("DORAT_DATA"):
        base = Path(os.environ["DORAT_DATA"])
    else:
        base = Path.home() / ".cache" / "dorat"
    return base.expanduser() / "imagefolder"


def _decode(path: Path, expect: tuple[str, tuple[int, int]] | None, first: Path | None
            ) -> tuple[np.ndarray, tuple[str, tuple[int, int]]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()  # decodes the whole file: a truncated one fails here
            got = (im.mode, im.size)
            if im.mode not in MODES:
                raise DataError(f"image {path} has mode {im.mode}; dorat reads greyscale (L) and "
                                "RGB images: convert the folder to one of them")
            if expect is not None and got != expect:
                raise DataError(
                    f"image {path} is {im.size[0]}×{im.size[1]} {im.mode} but {first} is "
                    f"{expect[1][0]}×{expect[1][1]} {expect[0]}; every image of the data set needs "
                    "one size and mode (resize or convert them)")
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e}); replace or remove it") from None
    return (arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)), got


def _decode_all(files: dict[str, list[tuple[Path, int]]], root: Path, progress: bool
                ) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    total = sum(len(v) for v in files.values())
    if total >= NOTICE_FROM or progress:  # a few images decode in a blink: no word about them
        print(f"decoding {total} images of {root} once (later runs read the cache)", file=sys.stderr)
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr)
    expect, first = None, None
    out: dict[str, np.ndarray] = {}
    try:
        for split in ("train", "test"):
            x = None
            for i, (f, _) in enumerate(files[split]):
                arr, got = _decode(f, expect, first)
                if expect is None:
                    expect, first = got, f
                if x is None:
                    x = np.empty((len(files[split]), *arr.shape), np.uint8)
                x[i] = arr
                bar.update()
            out[f"x_{split}"] = x  # type: ignore[assignment]
            out[f"y_{split}"] = np.asarray([lab for _, lab in files[split]], np.int64)
    finally:
        bar.close()
    return out


def _write_cache(path: Path, arrays: dict[str, np.ndarray], classes: list[str]) -> None:
    """Atomically (a temporary file, then a rename); a read-only place only costs the cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    except OSError as e:
        print(f"dorat: cannot cache the decoded images in {path.parent} ({e.strerror}); the next "
              "run decodes them again (pass a writable --data-dir)", file=sys.stderr)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, classes=np.asarray(classes, dtype=str), **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_cache(path: Path) -> tuple | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            a = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes")}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
        return None  # damaged: decode again and replace it
    return a["x_train"], a["y_train"], a["x_test"], a["y_test"], [str(c) for c in a["classes"]]


def read_imagefolder(root: Path, data_dir: str | None = None, progress: bool | None = None
                     ) -> tuple:
    """(x_train, y_train, x_test, y_test, classes) of an image folder, from its cache if fresh."""
    classes, files = _listing(root)
    cache = cache_dir(data_dir) / f"{cache_key(root, files)}.npz"
    if cache.is_file():
        got = _read_cache(cache)
        if got is not None and got[4] == classes:
            return got
    arrays = _decode_all(files, root, sys.stderr.isatty() if progress is None else progress)
    _write_cache(cache, arrays, classes)
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], classes


def arrays_sha256(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                  y_test: np.ndarray) -> str:
    """One digest of the decoded arrays (shapes and bytes): what docs record for a data copy."""
    h = hashlib.sha256()
    for a in (x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64)):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

