"""Every reader on small files written in the dataset's real format; splits and batching."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_mnist_dir, write_idx
from dorat.data import load_dataset, locate
from dorat.data.loader import Batches, Split, longtail_counts, make_splits
from dorat.data.readers import read_idx
from dorat.errors import DataError


def test_idx_gz_and_plain_roundtrip(tmp_path: Path) -> None:
    for gz in (True, False):
        root = tmp_path / f"m{gz}"
        x, y, xt, yt = make_mnist_dir(root, gz=gz)
        ds = load_dataset("mnist", data_dir=str(tmp_path / f"m{gz}"), allow_download=False)
        assert ds.x_train.shape == (60, 1, 28, 28) and ds.x_train.dtype == torch.uint8
        assert torch.equal(ds.x_train[:, 0], torch.from_numpy(x))
        assert torch.equal(ds.y_test, torch.from_numpy(yt.astype(np.int64)))
        assert ds.classes == [str(i) for i in range(10)]


def test_fashion_mnist_names_and_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_mnist_dir(tmp_path / "env" / "fashion-mnist", seed=1)
    make_mnist_dir(tmp_path / "explicit" / "fashion-mnist", seed=2)
    monkeypatch.setenv("DORAT_DATA", str(tmp_path / "env"))
    assert locate("fashion-mnist", str(tmp_path / "explicit")) == tmp_path / "explicit" / "fashion-mnist"
    assert locate("fashion-mnist", None) == tmp_path / "env" / "fashion-mnist"
    ds = load_dataset("fashion-mnist", allow_download=False)
    assert ds.classes[6] == "Shirt" and ds.num_classes == 10


def test_idx_corrupted_header_truncated_and_bad_gzip(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "a", np.zeros((4, 5, 5), np.uint8), gz=False)
    raw = p.read_bytes()
    p.write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(DataError, match="no valid IDX header"):
        read_idx(p, 3)
    p.write_bytes(raw[:-7])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p, 3)
    g = tmp_path / "b.gz"
    g.write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(DataError, match="not a complete gzip"):
        read_idx(g, 3)
    p.write_bytes(raw)
    with pytest.raises(DataError, match="dimensions"):
        read_idx(p, 1)


def _cifar_batch(path: Path, n: int, label_key: str, k: int, seed: int) -> tuple[np.ndarray, list]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, k, n)]
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": data, label_key.encode(): labels}, f, protocol=2)
    return data, labels


def test_cifar10_and_cifar100_pickles(tmp_path: Path) -> None:
    root = tmp_path / "cifar10" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    first = None
    for i in range(1, 6):
        d, l = _cifar_batch(root / f"data_batch_{i}", 7, "labels", 10, i)
        first = first or (d, l)
    _cifar_batch(root / "test_batch", 5, "labels", 10, 9)
    names = [f"c{i}".encode() for i in range(10)]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)
    ds = load_dataset("cifar10", data_dir=str(tmp_path), allow_download=False)
    assert ds.x_train.shape == (35, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    assert torch.equal(ds.x_train[0], torch.from_numpy(first[0][0].reshape(3, 32, 32)))
    assert ds.y_train[:7].tolist() == first[1] and ds.classes[3] == "c3"
    assert ds.augment == "crop-flip"

    root = tmp_path / "cifar100" / "cifar-100-python"
    root.mkdir(parents=True)
    _, l = _cifar_batch(root / "train", 11, "fine_labels", 100, 1)
    _cifar_batch(root / "test", 4, "fine_labels", 100, 2)
    with open(root / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, f, protocol=2)
    ds = load_dataset("cifar100", data_dir=str(tmp_path), allow_download=False)
    assert ds.num_classes == 100 and ds.y_train.tolist() == l


def _cifar10_folder(root: Path) -> None:
    root.mkdir(parents=True)
    for i in range(1, 6):
        _cifar_batch(root / f"data_batch_{i}", 7, "labels", 10, i)
    _cifar_batch(root / "test_batch", 5, "labels", 10, 9)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f, protocol=2)


def test_cifar10_archive_put_in_the_folder_is_checked_and_unpacked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The offline message says: put cifar-10-python.tar.gz in the folder. That works: its MD5 is
    checked (here the MD5 of this small archive in the real layout stands in for the real one),
    it is unpacked, and a wrong file is one clear error naming the MD5 expected."""
    import dataclasses
    import hashlib
    import tarfile

    from dorat.data import registry

    _cifar10_folder(tmp_path / "src" / "cifar-10-batches-py")
    folder = tmp_path / "data" / "cifar10"
    folder.mkdir(parents=True)
    archive = folder / "cifar-10-python.tar.gz"
    with pytest.raises(DataError, match=r"cifar-10-python.tar.gz \(MD5 c58f30108f718f92721af3b95e74349a\)"):
        load_dataset("cifar10", data_dir=str(tmp_path / "data"), allow_download=False)
    archive.write_bytes(b"not the archive")
    with pytest.raises(DataError, match="expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", data_dir=str(tmp_path / "data"), allow_download=False)
    with tarfile.open(archive, "w:gz") as t:
        t.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    spec = registry.SPECS["cifar10"]
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setitem(registry.SPECS, "cifar10", dataclasses.replace(
        spec, downloads=[dataclasses.replace(spec.downloads[0], md5=md5)]))
    ds = load_dataset("cifar10", data_dir=str(tmp_path / "data"), allow_download=False)
    assert ds.x_train.shape == (35, 3, 32, 32) and ds.classes[3] == "c3"
    assert sorted(p.name for p in folder.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    # an archive with a link or a path outside the folder is refused, nothing unpacked
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "cifar10").mkdir()
    bad = evil / "cifar10" / "cifar-10-python.tar.gz"
    with tarfile.open(bad, "w:gz") as t:
        info = tarfile.TarInfo("../../outside.txt")
        info.size = 0
        t.addfile(info)
    bad_md5 = hashlib.md5(bad.read_bytes()).hexdigest()
    monkeypatch.setitem(registry.SPECS, "cifar10", dataclasses.replace(
        spec, downloads=[dataclasses.replace(spec.downloads[0], md5=bad_md5)]))
    with pytest.raises(DataError, match="outside"):
        load_dataset("cifar10", data_dir=str(evil), allow_download=False)
    assert not (tmp_path / "outside.txt").exists() and [p.name for p in (evil / "cifar10").iterdir()] == [
        "cifar-10-python.tar.gz"]


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "cifar100" / "cifar-100-python"
    root.mkdir(parents=True)

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (tmp_path / "pwned",))

    for name in ("train", "test", "meta"):
        with open(root / name, "wb") as f:
            pickle.dump({b"data": Evil()}, f)
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar100", data_dir=str(tmp_path), allow_download=False)
    assert not (tmp_path / "pwned").exists()


def test_svhn_mat(tmp_path: Path) -> None:
    import scipy.io

    root = tmp_path / "svhn"
    root.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 9), ("test", 4)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.arange(1, n + 1).reshape(-1, 1) % 10 + 1  # labels 1..10, 10 = digit 0
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": X, "y": y})
        if split == "train":
            X0, y0 = X, y
    ds = load_dataset("svhn", data_dir=str(tmp_path), allow_download=False)
    assert ds.x_train.shape == (9, 3, 32, 32)
    assert torch.equal(ds.x_train[2], torch.from_numpy(X0[:, :, :, 2].transpose(2, 0, 1).copy()))
    expect = y0.reshape(-1).copy()
    expect[expect == 10] = 0
    assert ds.y_train.tolist() == expect.tolist() and ds.y_train.max() <= 9


def test_stl10_binary(tmp_path: Path) -> None:
    root = tmp_path / "stl10" / "stl10_binary"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    imgs = {}
    for split, n in (("train", 3), ("test", 2)):
        chw = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        imgs[split] = chw
        # the files store each image column-major: N×C×W×H
        (root / f"{split}_X.bin").write_bytes(chw.transpose(0, 1, 3, 2).tobytes())
        (root / f"{split}_y.bin").write_bytes(np.arange(1, n + 1, dtype=np.uint8).tobytes())
    (root / "class_names.txt").write_text("\n".join(f"n{i}" for i in range(10)))
    ds = load_dataset("stl10", data_dir=str(tmp_path), allow_download=False)
    assert torch.equal(ds.x_train, torch.from_numpy(imgs["train"]))
    assert ds.y_train.tolist() == [0, 1, 2] and ds.classes[0] == "n0"
    (root / "train_X.bin").write_bytes(imgs["train"].tobytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        load_dataset("stl10", data_dir=str(tmp_path), allow_download=False)


def test_gtsrb_images_and_csv(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "gtsrb"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    for c in (0, 2):
        d = root / "GTSRB" / "Final_Training" / "Images" / f"{c:05d}"
        d.mkdir(parents=True)
        rows = header
        for i in range(2):
            Image.new("RGB", (40, 36), (10 * c, 100, 200)).save(d / f"{i:05d}_00000.ppm")
            rows += f"{i:05d}_00000.ppm;40;36;5;5;35;31;{c}\n"
        (d / f"GT-{c:05d}.csv").write_text(rows)
    td = root / "GTSRB" / "Final_Test" / "Images"
    td.mkdir(parents=True)
    Image.new("RGB", (50, 50), (255, 0, 0)).save(td / "00000.ppm")
    (root / "GT-final_test.csv").write_text(header + "00000.ppm;50;50;5;5;45;45;2\n")
    ds = load_dataset("gtsrb", data_dir=str(tmp_path), allow_download=False)
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.y_train.tolist() == [0, 0, 2, 2]
    assert ds.num_classes == 43 and ds.y_test.tolist() == [2]
    assert ds.x_test[0, 0].float().mean() == 255 and ds.x_test[0, 1].float().mean() == 0


def test_npz_loader_and_its_errors(tmp_path: Path) -> None:
    p = tmp_path / "d.npz"
    x = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    np.savez(p, x_train=x, y_train=np.array([0, 1, 2, 0, 1, 2]), x_test=x[:3], y_test=np.array([0, 1, 2]),
             classes=np.array(["a", "b", "c"]))
    ds = load_dataset(f"npz:{p}")
    assert ds.x_train.shape == (6, 3, 8, 8) and ds.classes == ["a", "b", "c"]
    assert torch.equal(ds.x_train[1, 2], torch.from_numpy(x[1, :, :, 2]))
    np.savez(p, x_train=x.astype(np.float32), y_train=np.zeros(6), x_test=x, y_test=np.zeros(6))
    with pytest.raises(DataError, match="uint8"):
        load_dataset(f"npz:{p}")
    np.savez(p, x_train=x, y_train=np.zeros(5, np.int64), x_test=x, y_test=np.zeros(6, np.int64))
    with pytest.raises(DataError, match="one label per image"):
        load_dataset(f"npz:{p}")
    np.savez(p, x_train=x, y_train=np.array([0, 1, 2, 0, 1, 9]), x_test=x[:1], y_test=np.array([0]),
             classes=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match="classes"):
        load_dataset(f"npz:{p}")
    np.savez(p, x_train=x[:0], y_train=np.zeros(0, np.int64), x_test=x, y_test=np.zeros(6, np.int64))
    with pytest.raises(DataError, match="empty"):
        load_dataset(f"npz:{p}")
    with pytest.raises(DataError, match="lacks"):
        np.savez(p, x_train=x)
        load_dataset(f"npz:{p}")


def test_missing_dataset_offline_names_package_url_and_dir(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import dorat.data.fetch as fetch

    monkeypatch.setattr(fetch, "DEBIAN_ROOT", tmp_path / "none")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DORAT_DATA", raising=False)
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "d"), allow_download=False)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "d") in msg


def test_download_checks_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local file:// source stands in for the network: good MD5 installs, bad MD5 refuses."""
    import hashlib

    import dorat.data.fetch as fetch
    from dorat.data.registry import MNIST_FILES, SPECS, Download

    src = tmp_path / "src"
    make_mnist_dir(src)
    good = [Download((src / (f + ".gz")).as_uri(), hashlib.md5((src / (f + ".gz")).read_bytes()).hexdigest())
            for f in MNIST_FILES]
    spec = SPECS["mnist"]
    monkeypatch.setitem(SPECS, "mnist", type(spec)(**{**spec.__dict__, "downloads": good}))
    root = fetch.download("mnist", str(tmp_path / "dl"))
    assert load_dataset("mnist", str(tmp_path / "dl"), allow_download=False).x_train.shape[0] == 60
    bad = [Download(d.url, "0" * 32) for d in good]
    monkeypatch.setitem(SPECS, "mnist", type(spec)(**{**spec.__dict__, "downloads": bad}))
    with pytest.raises(DataError, match="MD5"):
        fetch.download("mnist", str(tmp_path / "dl2"))
    assert root.is_dir() and not list((tmp_path / "dl2" / "mnist").glob("*.gz"))


def test_longtail_profile_counts() -> None:
    assert longtail_counts(1000, 10, 10.0) == [1000, 774, 599, 464, 359, 278, 215, 166, 129, 100]
    y = torch.arange(10).repeat_interleave(100)
    x = torch.zeros(1000, 1, 2, 2, dtype=torch.uint8)
    train, val = make_splits(x, y, 10, seed=0, val_size=100, imbalance_ratio=10)
    assert val is not None and torch.bincount(val.y, minlength=10).tolist() == [10] * 10
    counts = torch.bincount(train.y, minlength=10).tolist()
    assert counts == longtail_counts(90, 10, 10.0)
    assert counts[0] / counts[-1] == pytest.approx(10, rel=0.01)
    sub, _ = make_splits(x, y, 10, seed=0, train_subset=50)
    assert torch.bincount(sub.y, minlength=10).tolist() == [5] * 10


def test_batches_deterministic_resumable_and_augmented() -> None:
    x = torch.arange(20 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).view(20, 3, 8, 8)
    split = Split(x, torch.arange(20))
    b = Batches(split, 6, shuffle=True, seed=3, augment="crop-flip", pad=2)
    full = list(b.epoch(4))
    assert len(full) == 4 and sum(len(yb) for _, yb in full) == 20
    again = list(b.epoch(4, start=2))
    assert all(torch.equal(a[0], c[0]) for a, c in zip(full[2:], again))
    assert not torch.equal(full[0][1], list(b.epoch(5))[0][1])  # another epoch, another order
    plain = Batches(split, 20, shuffle=False, augment="crop", pad=2)
    (xb, _), = list(plain.epoch(0))
    src = x.float() / 255
    # every crop is a shifted window of the zero-padded image
    padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
    for i in range(20):
        assert any(torch.equal(xb[i], padded[i, :, dy:dy + 8, dx:dx + 8])
                   for dy in range(5) for dx in range(5))
    flip = Batches(split, 20, shuffle=False, augment="crop-flip", pad=0)
    (xf, _), = list(flip.epoch(0))
    flipped = [torch.equal(xf[i], src[i].flip(2)) for i in range(20)]
    assert all(f or torch.equal(xf[i], src[i]) for i, f in enumerate(flipped)) and 0 < sum(flipped) < 20

