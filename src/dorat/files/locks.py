"""A run directory is owned by one process at a time.

The owner holds an OS lock (``flock`` on POSIX, ``msvcrt.locking`` on Windows) on RUN/.lock. The
kernel releases it when the process ends, however it ends (exit, kill -9, a node reboot on a local
disk), so there is no stale lock to detect or take over and no race between two processes that
both think a lock is stale. The owner removes the file before it releases the lock, and a process that
locked a file which is no longer at RUN/.lock tries again, so two processes never own one directory
through two inodes. The file holds the owner's pid, for messages only.

Ownership is re-entrant within a process: `dorat compare` holds a run while its `train` and
evaluations run in the same process."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK = ".lock"

_held: dict[Path, int] = {}  # run directory -> depth, in this process


class Busy(Exception):
    """Another live process owns the directory; ``pid`` is its pid when it could be read."""

    def __init__(self, path: Path, pid: int | None) -> None:
        super().__init__(f"{path} is in use by another process" + (f" (pid {pid})" if pid else ""))
        self.path, self.pid = path, pid


def _try_lock(fd: int) -> bool:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    return True


def owner(path: Path) -> int | None:
    """The pid recorded by the last owner of ``path`` (it may have ended), when readable."""
    try:
        text = (path / LOCK).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextlib.contextmanager
def own(path: str | Path) -> Iterator[None]:
    """Own the run directory ``path`` while the block runs; raises `Busy` at once when another
    live process owns it. A directory this call created is removed again if the block leaves it
    empty (a run refused before it wrote anything leaves nothing behind)."""
    path = Path(path).resolve()
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path)
    _held[path] = 1
    try:
        yield
    finally:
        del _held[path]
        with contextlib.suppress(OSError):  # still held: a waiting opener sees a removed inode
            (path / LOCK).unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                path.rmdir()  # only if empty


def _acquire(path: Path) -> int:
    """Lock RUN/.lock; retried when the file was removed or replaced between open and lock (its
    owner released it meanwhile), so two processes never hold locks on two different inodes."""
    while True:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            os.close(fd)
            raise Busy(path, owner(path))
        try:
            same = os.fstat(fd).st_ino == os.stat(path / LOCK).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)
