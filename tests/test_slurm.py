"""`dorat compare --launcher slurm` on a real single-node Slurm cluster (scripts/slurm-up.sh
installs and starts it; CI runs as root): the results equal the local launcher's, and a job
cancelled mid-run is resubmitted by the next command and resumes bitwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_synthetic_npz

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("submitit")


@pytest.fixture(scope="module")
def cluster() -> None:
    """A reachable Slurm cluster, or a skip with its reason: `make test` installs no system
    packages and starts no services (`make slurm` does: a single-node cluster, as root). CI
    starts the cluster first and sets DORAT_REQUIRE_SLURM=1, which makes a missing one a failure."""
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True) \
        if _has("sinfo") else None
    if up is not None and up.returncode == 0 and any(s in up.stdout for s in ("idle", "mixed", "alloc")):
        return
    why = "no Slurm cluster answers sinfo; `make slurm` starts a single-node one (root)"
    if os.environ.get("DORAT_REQUIRE_SLURM") == "1":
        pytest.fail(why)
    pytest.skip(why)


def _has(cmd: str) -> bool:
    import shutil

    return shutil.which(cmd) is not None


def _grid(tmp: Path, npz: Path, epochs: int, methods: str) -> Path:
    f = tmp / "grid.yaml"
    f.write_text(f"""
title: slurm test
base: null
set: {{dataset: "npz:{npz}", epochs: {epochs}, batch_size: 64, attack.steps: 2, eval.n: 40,
      eval.steps: 3, eval.checks: false}}
methods: {methods}
seeds: [0]
""")
    return f


def _compare(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "dorat", "compare", *args], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=ROOT)


def _runs(out: Path) -> dict[str, Path]:
    return {p.parent.parent.name: p.parent for p in out.rglob("seed0/metrics.json")}


def _numbers(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    return {k: m[k] for k in ("sa", "ra", "per_class", "worst_class", "tail30", "n")}


def test_slurm_launcher_equals_local(cluster: None, tmp_path: Path) -> None:
    npz = make_synthetic_npz(tmp_path / "toy.npz")
    grid = _grid(tmp_path, npz, 1, "[at, done]")
    t0 = time.perf_counter()
    r = _compare(str(grid), "--out", str(tmp_path / "slurm"), "--launcher", "slurm",
                 "--slurm-cpus", "1", "--slurm-time", "30")
    slurm_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    assert "submitted as Slurm job" in r.stderr and r.stderr.count("finished the run") == 2
    t0 = time.perf_counter()
    r = _compare(str(grid), "--out", str(tmp_path / "local"))
    local_s = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    a, b = _runs(tmp_path / "slurm"), _runs(tmp_path / "local")
    assert sorted(a) == sorted(b) == ["at", "done"]
    for name in a:
        assert _numbers(a[name]) == _numbers(b[name]), name
        assert (a[name] / "model.safetensors").read_bytes() == (b[name] / "model.safetensors").read_bytes()
        logs = list((a[name] / "slurm").glob("*_log.err"))
        assert logs and "epoch 1/1" in logs[0].read_text()  # the job's messages are in its run
    jobs = json.loads((tmp_path / "slurm" / "slurm-jobs.json").read_text())
    assert len(jobs) == 2
    print(f"2-run grid: slurm launcher {slurm_s:.1f} s, local {local_s:.1f} s")
    # run again: nothing to do, nothing resubmitted
    r = _compare(str(grid), "--out", str(tmp_path / "slurm"), "--launcher", "slurm")
    assert r.returncode == 0 and "submitted" not in r.stderr and "2 finished, 0 to go" in r.stderr


def test_cancelled_job_is_resubmitted_and_resumes_bitwise(cluster: None, tmp_path: Path) -> None:
    npz = make_synthetic_npz(tmp_path / "toy.npz", n_train=1024)  # epochs of a few seconds
    grid = _grid(tmp_path, npz, 3, "[done]")
    out = tmp_path / "slurm"
    r = _compare(str(grid), "--out", str(out), "--launcher", "slurm", "--no-wait")
    assert r.returncode == 0, r.stderr
    jid = next(iter(json.loads((out / "slurm-jobs.json").read_text()).values()))
    run = next(out.rglob("seed0"))
    deadline = time.time() + 300
    while not ((run / "checkpoint.safetensors").is_file()  # epoch 1 written: log line, then this
               and (run / "log.jsonl").read_text().count("\n") >= 1):
        assert time.time() < deadline, "the job never finished its first epoch"
        time.sleep(0.5)
    subprocess.run(["scancel", jid], check=True)
    while jid in subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split():
        time.sleep(0.5)
    assert not (run / "metrics.json").is_file(), "the run finished before it could be cancelled"
    r = _compare(str(grid), "--out", str(out), "--launcher", "slurm")
    assert r.returncode == 0, r.stderr
    assert f"(job {jid} ended before the run finished)" in r.stderr and "finished the run" in r.stderr
    epochs = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    r = _compare(str(grid), "--out", str(tmp_path / "local"))  # the same run, never interrupted
    assert r.returncode == 0, r.stderr
    ref = next((tmp_path / "local").rglob("seed0"))
    for f in ("model.safetensors", "checkpoint.safetensors"):
        assert (run / f).read_bytes() == (ref / f).read_bytes(), f
    assert _numbers(run) == _numbers(ref)
