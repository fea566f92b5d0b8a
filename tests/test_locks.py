"""A run directory is owned by one process at a time (dorat.files.locks): a second owner is refused at
once, a killed owner releases it, contending processes never overlap, and `dorat train` refuses a
directory another process trains in without touching it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import holder
from dorat.cli import main
from dorat.files import locks


def test_a_second_owner_is_refused_until_the_first_is_killed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with holder(run) as p:
        with pytest.raises(locks.Busy) as e, locks.own(run):
            pass
        assert e.value.pid == p.pid
    with locks.own(run):  # kill -9 released it: no stale lock to detect or take over
        assert (run / locks.LOCK).read_text() == str(os.getpid())
        with locks.own(run):  # re-entrant in one process (compare -> train)
            pass
        assert (run / locks.LOCK).is_file()
    assert run.is_dir() and not (run / locks.LOCK).exists()  # the owner removes its lock file
    with locks.own(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()  # created by own() and left empty: removed again


def test_contending_processes_never_own_a_directory_together(tmp_path: Path) -> None:
    """Four processes take and release one directory 40 times each; every owner writes an
    enter and a leave line, which must then never interleave between two processes."""
    journal = tmp_path / "journal"
    code = """
import os, sys, time
from dorat.files import locks
run, journal, n = sys.argv[1], sys.argv[2], 0
fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
while n < 40:
    try:
        with locks.own(run):
            os.write(fd, f"in {os.getpid()}\\n".encode()); time.sleep(0.001)
            os.write(fd, f"out {os.getpid()}\\n".encode())
        n += 1
    except locks.Busy:
        time.sleep(0.0005)
"""
    (tmp_path / "run").mkdir()  # kept: the owners remove only the lock file
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run"), str(journal)])
             for _ in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = journal.read_text().split()
    pairs = [lines[i:i + 4] for i in range(0, len(lines), 4)]
    assert len(lines) == 4 * 40 * 4
    assert all(a == "in" and c == "out" and b == d for a, b, c, d in pairs)
    assert not (tmp_path / "run" / locks.LOCK).exists()


def test_train_refuses_a_directory_another_process_trains_in(
        tmp_path: Path, synthetic_npz: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("marker: kept\n")  # the other run's file
    args = ["train", "--method", "at", "--dataset", f"npz:{synthetic_npz}", "--epochs", "1"]
    with holder(run) as p:
        for extra in ([], ["--overwrite"], ["--resume"]):
            assert main([*args, "--out", str(run), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err == (f"dorat: error: {run} is in use by another dorat process (pid {p.pid}); "
                           "wait for it to finish or choose another --out")
    assert sorted(f.name for f in run.iterdir()) == [".lock", "config.yaml"]  # left by kill -9
    assert (run / "config.yaml").read_text() == "marker: kept\n"
    # a refused run leaves no directory behind
    fresh = tmp_path / "fresh"
    assert main([*args, "--out", str(fresh), "--set", "eval.n=2"]) == 2
    assert "eval.n=2 is smaller than the 4 classes" in capsys.readouterr().err
    assert not fresh.exists()
