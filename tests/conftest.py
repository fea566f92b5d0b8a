from __future__ import annotations

import contextlib
import gzip
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # one pytest-xdist worker a core: one thread each
    os.environ["OMP_NUM_THREADS"] = "1"  # and in the processes the tests start
    torch.set_num_threads(1)
else:
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    """Write an array in the IDX format (MNIST): magic 0 0 0x08 ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "i" * arr.ndim, *arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_mnist_dir(root: Path, n_train: int = 60, n_test: int = 20, gz: bool = True,
                   seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    x = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    y = (np.arange(n_train) % 10).astype(np.uint8)
    xt = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    yt = (np.arange(n_test) % 10).astype(np.uint8)
    write_idx(root / "train-images-idx3-ubyte", x, gz)
    write_idx(root / "train-labels-idx1-ubyte", y, gz)
    write_idx(root / "t10k-images-idx3-ubyte", xt, gz)
    write_idx(root / "t10k-labels-idx1-ubyte", yt, gz)
    return x, y, xt, yt


def make_synthetic_npz(path: Path, n_train: int = 512, n_test: int = 200, size: int = 28,
                       channels: int = 0, num_classes: int = 4, seed: int = 0) -> Path:
    """A learnable toy task: each class brightens its own band of rows, plus noise."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % num_classes
        x = rng.normal(60, 25, (n, size, size))
        band = size // num_classes
        for c in range(num_classes):
            x[y == c, c * band:(c + 1) * band, :] += 120
        x = np.clip(x, 0, 255).astype(np.uint8)
        if channels:
            x = np.repeat(x[..., None], channels, axis=3)
        return x, y.astype(np.int64)

    x, y = make(n_train)
    xt, yt = make(n_test)
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt)
    return path


@pytest.fixture
def synthetic_npz(tmp_path: Path) -> Path:
    return make_synthetic_npz(tmp_path / "toy.npz")


def fmnist_available() -> bool:
    from dorat.data import locate

    return locate("fashion-mnist") is not None


needs_fmnist = pytest.mark.skipif(
    not fmnist_available(),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)


@contextlib.contextmanager
def holder(path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process that owns the run directory ``path`` (dorat.files.locks) until the block ends,
    when it is killed with SIGKILL (it never releases the lock itself)."""
    code = ("import sys, time; from dorat import locks\n"
            "with locks.own(sys.argv[1]):\n    print('owned', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "owned"
        yield p
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`dorat ARGV` in this process: exit code, stdout, stderr."""
    from dorat.cli import main

    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors (one line through dorat.cli._Parser)
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
