"""The benchmarks in smoke mode: every row and target is produced and the doc block is replaced
in place (speed is not asserted here; docs/PERFORMANCE.md holds the real runs); and the
process-wide allocator setting (dorat.system.runtime) they measure."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "perf"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_perf_smoke_produces_every_row(tmp_path: Path) -> None:
    perf = _bench()
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\nintro\n\n{perf.MARK_BEGIN}\nold table\n{perf.MARK_END}\n\nafter\n")
    r = perf.main(["--smoke", "--json", str(tmp_path / "p.json"), "--doc", str(doc)])
    assert set(r["rows"]) == {"reference", "at", "at-nchw", "done", "done-diag", "done-cid", "trades"}
    for row in r["rows"].values():
        for key in ("step_ms", "examples_per_s", "gflop_per_step", "flop_rate_fraction_of_gemm",
                    "vs_reference", "step_time_x_at"):
            assert math.isfinite(row[key]) and row[key] > 0, key
    # the attack passes dominate: a PGD-2 step costs > 2x a plain forward-backward's FLOPs
    assert r["rows"]["done-cid"]["gflop_per_step"] > r["rows"]["at"]["gflop_per_step"]
    assert set(r["targets"]) == {"at", "done", "done-diag", "done-cid"}
    assert r["eval_pgd20_examples_per_s"] > 0 and r["gemm_gflops"] > 0
    assert json.loads((tmp_path / "p.json").read_text())["rows"].keys() == r["rows"].keys()
    text = doc.read_text()
    assert "old table" not in text and "intro" in text and "after" in text
    assert text.count(perf.MARK_BEGIN) == 1 and "| reference |" in text


def test_workers_benchmark_smoke(tmp_path: Path) -> None:
    mod = _bench("workers")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n\nafter\n")
    r = mod.main(["--smoke", "--runs", "2", "--rounds", "1", "--doc", str(doc)])
    assert len(r["seconds"]["1"]) == len(r["seconds"]["2"]) == 1
    assert r["median_seconds"]["1"] > 0 and r["median_seconds"]["2"] > 0
    assert math.isclose(r["speedup"], r["median_seconds"]["1"] / r["median_seconds"]["2"])
    text = doc.read_text()
    assert "old" not in text and "`--workers 2`" in text and text.endswith("after\n")


def test_autoattack_benchmark_smoke(tmp_path: Path) -> None:
    mod = _bench("autoattack")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n")
    r = mod.main(["--smoke", "--n", "16", "--rounds", "2", "--doc", str(doc)])
    assert r["same_points"] and r["n"] == 16
    assert all(len(v) == 2 and min(v) > 0 for v in r["seconds"].values())
    assert "dorat adapter, weights frozen" in doc.read_text() and "old" not in doc.read_text()


def test_cifar_budget_benchmark_smoke(tmp_path: Path) -> None:
    mod = _bench("cifar_budget")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n")
    r = mod.main(["--smoke", "--doc", str(doc)])
    assert set(r["rows"]) == {"vgg8-w16", "resnet20"}
    for row in r["rows"].values():
        assert row["examples_per_s"] > 0 and row["gflop_per_example"] > 0 and row["epochs_in_budget"] > 0
    # resnet20 does more work per image than the 16-wide VGG8
    assert r["rows"]["resnet20"]["gflop_per_example"] > r["rows"]["vgg8-w16"]["gflop_per_example"]
    assert all(v > 0 for v in r["machine_gflops"].values())
    assert "| vgg8-w16 |" in doc.read_text() and "old" not in doc.read_text()


def test_allocator_benchmark_smoke(tmp_path: Path) -> None:
    mod = _bench("allocator")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n")
    r = mod.main(["--smoke", "--rounds", "1", "--threads", "1", "--doc", str(doc)])
    # the allocator changes where memory comes from, never a number
    assert r["bitwise_identical"]
    assert set(r["speedup"]) == set(mod.PARTS) and all(v > 0 for v in r["speedup"].values())
    states = r["allocator"]
    assert states["glibc defaults (DORAT_MALLOC=system)"].startswith("left alone")
    if platform.libc_ver()[0] == "glibc":
        assert states["dorat (tune_allocator)"] == "tuned"
    assert "| eval PGD-20 + CW |" in doc.read_text() and "old" not in doc.read_text()


_FAULTS = """
import resource, sys, torch
from dorat.system.runtime import tune_allocator
state = tune_allocator()
def churn():
    for _ in range(20):  # a 48 MiB activation, made and freed as every forward pass does
        torch.ones(12 * 2**20).sum()
churn()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(state, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tune_allocator acts on glibc only")
def test_tune_allocator_stops_the_page_fault_churn() -> None:
    def faults(setting: str) -> tuple[str, int]:
        env = {**os.environ, "DORAT_MALLOC": setting}
        out = subprocess.run([sys.executable, "-c", _FAULTS], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        return " ".join(out[:-1]), int(out[-1])

    (s_sys, f_sys), (s_ours, f_ours) = faults("system"), faults("auto")
    assert s_sys == "left alone (DORAT_MALLOC=system)" and s_ours == "tuned"
    assert f_sys > 20 * 12 * 2**20 * 4 // 4096 // 2  # glibc maps (and faults in) every block anew
    assert f_ours < f_sys // 20  # the freed block is reused


@pytest.mark.parametrize("environ, expected", [
    ({"DORAT_MALLOC": "system"}, "DORAT_MALLOC=system"),
    ({"DORAT_MALLOC": "fast"}, "is not one of auto, system"),
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "another allocator"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "from the environment"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "from the environment"),
])
def test_tune_allocator_respects_the_users_choice(environ: dict[str, str], expected: str) -> None:
    from dorat.system.runtime import _reason_to_skip

    reason = _reason_to_skip(environ)
    assert reason is not None and reason.startswith("left alone") and expected in reason


def test_the_cli_tunes_the_allocator(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import dorat.system.runtime
    from dorat.cli import main

    calls: list[int] = []
    monkeypatch.setattr(dorat.system.runtime, "tune_allocator", lambda: calls.append(1) or "tuned")
    assert main(["data", "list"]) == 0 and calls == [1]


def test_compaction_benchmark_smoke(tmp_path: Path) -> None:
    """FAT with and without batch compaction: the same weights, bit for bit; a ratio reported."""
    mod = _bench("compaction")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n")
    r = mod.main(["--smoke", "--epochs", "2", "--rounds", "1", "--doc", str(doc)])
    assert r["same_weights"] and r["speedup"] > 0 and len(r["epoch_seconds"]["on"]) == 2
    assert "with compaction" in doc.read_text() and "old" not in doc.read_text()


def test_peers_benchmark_smoke(tmp_path: Path) -> None:
    """dorat's loop against torchattacks' and ART's (each skipped with a message when absent)."""
    mod = _bench("peers")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n")
    r = mod.main(["--smoke", "--doc", str(doc)])
    assert r["train_examples_per_s"]["dorat"] > 0 and r["eval_pgd20_examples_per_s"]["dorat"] > 0
    assert set(r["train_speedup"]) == set(r["train_examples_per_s"]) - {"dorat"}
    assert "| dorat |" in doc.read_text() and "old" not in doc.read_text()


def test_time_to_robust_benchmark_smoke(tmp_path: Path) -> None:
    mod = _bench("time_to_robust")
    doc = tmp_path / "PERF.md"
    doc.write_text(f"# Perf\n\n{mod.MARK_BEGIN}\nold\n{mod.MARK_END}\n")
    r = mod.main(["--smoke", "--doc", str(doc), "--plot", str(tmp_path / "t.png")])
    assert set(r["rows"]) == set(mod.METHODS) and r["rows"]["at"]["fraction_of_at_time"] <= 1.0
    assert all(len(c) == 2 for c in r["curves"].values())
    assert (tmp_path / "t.png").stat().st_size > 5000 and "| fast-at |" in doc.read_text()
